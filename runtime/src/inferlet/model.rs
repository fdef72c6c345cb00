//! The `model` interface: facts about the served model, its tokenizer and
//! chat template.

use super::bindings::model::{Host, Info, Message};
use super::state::InstanceState;
use crate::chat_template::ChatMessage;
use crate::tokenizer::Tokenizer;

impl InstanceState {
    fn tokenizer(&self) -> Result<&Tokenizer, String> {
        let m = self.sched.model();
        m.tokenizer
            .as_ref()
            .ok_or_else(|| format!("model {} has no tokenizer.json", m.name))
    }
}

impl Host for InstanceState {
    async fn get_info(&mut self) -> wasmtime::Result<Info> {
        let m = self.sched.model();
        Ok(Info {
            name: m.name.clone(),
            arch: m.arch.clone(),
            vocab_size: m.vocab as u32,
            page_size: m.page_size as u32,
        })
    }

    async fn tokenize(
        &mut self,
        text: String,
        add_special_tokens: bool,
    ) -> wasmtime::Result<Result<Vec<u32>, String>> {
        Ok(self.tokenizer().and_then(|t| {
            t.encode(&text, add_special_tokens)
                .map_err(|e| e.to_string())
        }))
    }

    async fn detokenize(
        &mut self,
        tokens: Vec<u32>,
        skip_special_tokens: bool,
    ) -> wasmtime::Result<Result<String, String>> {
        Ok(self.tokenizer().and_then(|t| {
            t.decode(&tokens, skip_special_tokens)
                .map_err(|e| e.to_string())
        }))
    }

    async fn render_chat(
        &mut self,
        messages: Vec<Message>,
        add_generation_prompt: bool,
    ) -> wasmtime::Result<Result<String, String>> {
        let m = self.sched.model();
        let Some(template) = &m.chat_template else {
            return Ok(Err(format!("model {} has no chat template", m.name)));
        };
        let messages: Vec<ChatMessage> = messages
            .into_iter()
            .map(|m| ChatMessage {
                role: m.role,
                content: m.content,
            })
            .collect();
        Ok(template
            .render(&messages, add_generation_prompt)
            .map_err(|e| e.to_string()))
    }

    async fn stop_tokens(&mut self) -> wasmtime::Result<Vec<u32>> {
        Ok(self.sched.model().stop_ids.clone())
    }
}
