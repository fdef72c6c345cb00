//! The served model: tokenizer, chat template, stop tokens.

use crate::bindings::pie::inferlet::model;

#[derive(Debug, Clone)]
pub struct Model {
    info: model::Info,
    stop: Vec<u32>,
}

impl Model {
    /// The model the runtime serves.
    pub fn get() -> Model {
        Model {
            info: model::get_info(),
            stop: model::stop_tokens(),
        }
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }
    pub fn arch(&self) -> &str {
        &self.info.arch
    }
    pub fn vocab_size(&self) -> usize {
        self.info.vocab_size as usize
    }
    pub fn page_size(&self) -> usize {
        self.info.page_size as usize
    }
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop
    }

    /// Token ids of `text`, without special tokens added.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, String> {
        model::tokenize(text, false)
    }

    /// Text of `tokens`, special tokens left out.
    pub fn detokenize(&self, tokens: &[u32]) -> Result<String, String> {
        model::detokenize(tokens, true)
    }

    /// The conversation rendered with the model's chat template.
    pub fn render_chat(
        &self,
        messages: &[(String, String)],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let messages: Vec<model::Message> = messages
            .iter()
            .map(|(role, content)| model::Message {
                role: role.clone(),
                content: content.clone(),
            })
            .collect();
        model::render_chat(&messages, add_generation_prompt)
    }
}
