//! KV pages and the contexts that hold them.
//!
//! Pages are reference-counted: a fork shares every page of its parent, and
//! a page is copied only when a context is about to write into a page that
//! another context also holds (copy on write). The driver API has no page
//! copy, so the copy is made by running the page's tokens again into a fresh
//! page (at most `page_size - 1` tokens, the replay of a [`WritePlan`]).
//! Every method checks before it changes anything: an error leaves the
//! manager as it was.

use std::collections::HashMap;

pub type PageId = u32;
pub type ContextId = u64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("KV cache exhausted: {needed} more pages needed, {free} of {total} free")]
    Exhausted {
        needed: usize,
        free: usize,
        total: usize,
    },
    #[error("no context {0} (it was released)")]
    NoContext(ContextId),
    #[error("context {0} has a forward pass in flight; wait for it first")]
    Busy(ContextId),
    #[error("cannot trim context {id} to {len} tokens: it holds only {have}")]
    TrimPastEnd {
        id: ContextId,
        len: usize,
        have: usize,
    },
}

#[derive(Debug, Default)]
struct Context {
    /// Tokens whose keys and values are in the pages, in position order.
    tokens: Vec<u32>,
    /// Pages covering at least `tokens`, in position order.
    pages: Vec<PageId>,
    /// A forward pass is running on it: no change from outside until it ends.
    busy: bool,
    /// Released while busy: freed when the pass ends.
    released: bool,
}

/// Where a write of new tokens goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritePlan {
    /// Position of the first token to run (of the replay, if any).
    pub first_pos: usize,
    /// Tokens already in the context that must run again, before the new
    /// ones, because their page was shared and has been replaced.
    pub replay: Vec<u32>,
    /// The page table covering every position through the write.
    pub pages: Vec<PageId>,
}

#[derive(Debug)]
pub struct PageManager {
    page_size: usize,
    refcount: Vec<u32>,
    /// Free pages; popped from the end.
    free: Vec<PageId>,
    contexts: HashMap<ContextId, Context>,
    next_id: ContextId,
}

impl PageManager {
    pub fn new(num_pages: usize, page_size: usize) -> Self {
        PageManager {
            page_size: page_size.max(1),
            refcount: vec![0; num_pages],
            free: (0..num_pages as PageId).rev().collect(),
            contexts: HashMap::new(),
            next_id: 1,
        }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }
    pub fn total_pages(&self) -> usize {
        self.refcount.len()
    }
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }
    pub fn refcount(&self, page: PageId) -> u32 {
        self.refcount[page as usize]
    }
    pub fn num_contexts(&self) -> usize {
        self.contexts.len()
    }

    pub fn create(&mut self) -> ContextId {
        let id = self.next_id;
        self.next_id += 1;
        self.contexts.insert(id, Context::default());
        id
    }

    fn get(&self, id: ContextId) -> Result<&Context, KvError> {
        match self.contexts.get(&id) {
            Some(c) if !c.released => Ok(c),
            _ => Err(KvError::NoContext(id)),
        }
    }

    /// A context ready for a change from outside (not busy).
    fn idle_mut(&mut self, id: ContextId) -> Result<&mut Context, KvError> {
        match self.contexts.get_mut(&id) {
            Some(c) if c.released => Err(KvError::NoContext(id)),
            Some(c) if c.busy => Err(KvError::Busy(id)),
            Some(c) => Ok(c),
            None => Err(KvError::NoContext(id)),
        }
    }

    pub fn tokens(&self, id: ContextId) -> Result<&[u32], KvError> {
        Ok(&self.get(id)?.tokens)
    }

    pub fn pages(&self, id: ContextId) -> Result<&[PageId], KvError> {
        Ok(&self.get(id)?.pages)
    }

    /// A new context sharing the pages that hold `id`'s tokens.
    pub fn fork(&mut self, id: ContextId) -> Result<ContextId, KvError> {
        let page_size = self.page_size;
        let parent = self.idle_mut(id)?;
        let tokens = parent.tokens.clone();
        // Pages reserved past the last token are not shared: the child
        // would write into them too.
        let pages: Vec<PageId> = parent.pages[..tokens.len().div_ceil(page_size)].to_vec();
        for &p in &pages {
            self.refcount[p as usize] += 1;
        }
        let child = self.create();
        let c = self.contexts.get_mut(&child).expect("just created");
        c.tokens = tokens;
        c.pages = pages;
        Ok(child)
    }

    /// Frees the context's pages (later, if a pass is running on it).
    pub fn release(&mut self, id: ContextId) {
        let Some(c) = self.contexts.get_mut(&id) else {
            return;
        };
        if c.busy {
            c.released = true;
            return;
        }
        let c = self.contexts.remove(&id).expect("present");
        self.unref_all(&c.pages);
    }

    /// Keeps the first `len` tokens and the pages they need.
    pub fn trim(&mut self, id: ContextId, len: usize) -> Result<(), KvError> {
        let page_size = self.page_size;
        let c = self.idle_mut(id)?;
        if len > c.tokens.len() {
            return Err(KvError::TrimPastEnd {
                id,
                len,
                have: c.tokens.len(),
            });
        }
        c.tokens.truncate(len);
        let keep = len.div_ceil(page_size).min(c.pages.len());
        let dropped = c.pages.split_off(keep);
        self.unref_all(&dropped);
        Ok(())
    }

    /// Cuts a context back to `len` tokens even while it is busy: the
    /// scheduler undoing a failed pass.
    pub fn rollback(&mut self, id: ContextId, len: usize) {
        let page_size = self.page_size;
        let Some(c) = self.contexts.get_mut(&id) else {
            return;
        };
        c.tokens.truncate(len);
        let keep = c.tokens.len().div_ceil(page_size).min(c.pages.len());
        let dropped = c.pages.split_off(keep);
        self.unref_all(&dropped);
    }

    /// Allocates now the pages that `extra` more tokens will need.
    pub fn reserve(&mut self, id: ContextId, extra: usize) -> Result<(), KvError> {
        let page_size = self.page_size;
        let c = self.idle_mut(id)?;
        let want = (c.tokens.len() + extra).div_ceil(page_size);
        let needed = want.saturating_sub(c.pages.len());
        self.check_free(needed)?;
        let new = self.take(needed);
        self.contexts
            .get_mut(&id)
            .expect("checked")
            .pages
            .extend(new);
        Ok(())
    }

    /// How many tokens a write into `id` must replay (the filled part of
    /// its last page when that page is shared).
    pub fn replay_len(&self, id: ContextId) -> Result<usize, KvError> {
        let c = self.get(id)?;
        let len = c.tokens.len();
        let page = len / self.page_size;
        let shared = c
            .pages
            .get(page)
            .is_some_and(|&p| self.refcount[p as usize] > 1);
        Ok(if shared { len % self.page_size } else { 0 })
    }

    /// Makes the pages for writing `n` new tokens after `id`'s tokens
    /// private and present: shared pages in the write range are replaced
    /// (the first one's tokens replayed), missing pages allocated.
    pub fn prepare_write(&mut self, id: ContextId, n: usize) -> Result<WritePlan, KvError> {
        let ps = self.page_size;
        let c = self.get(id)?;
        let len = c.tokens.len();
        let (first, last) = (len / ps, (len + n).div_ceil(ps));
        let shared: Vec<usize> = (first..last.min(c.pages.len()))
            .filter(|&i| self.refcount[c.pages[i] as usize] > 1)
            .collect();
        let missing = last.saturating_sub(c.pages.len());
        self.check_free(shared.len() + missing)?;
        let replay_from = if shared.first() == Some(&first) {
            first * ps
        } else {
            len
        };
        let fresh = self.take(shared.len() + missing);
        let (swap, append) = fresh.split_at(shared.len());
        let c = self.contexts.get_mut(&id).expect("checked");
        let mut old = Vec::with_capacity(swap.len());
        for (&i, &p) in shared.iter().zip(swap) {
            old.push(std::mem::replace(&mut c.pages[i], p));
        }
        c.pages.extend_from_slice(append);
        let plan = WritePlan {
            first_pos: replay_from,
            replay: c.tokens[replay_from..].to_vec(),
            pages: c.pages.clone(),
        };
        self.unref_all(&old);
        Ok(plan)
    }

    /// Records tokens whose keys and values are now in the context's pages.
    pub fn commit(&mut self, id: ContextId, tokens: &[u32]) {
        if let Some(c) = self.contexts.get_mut(&id) {
            c.tokens.extend_from_slice(tokens);
        }
    }

    /// Marks a context busy (a pass starts) or idle (it ended); a context
    /// released meanwhile is freed when it becomes idle.
    pub fn set_busy(&mut self, id: ContextId, busy: bool) -> Result<(), KvError> {
        if busy {
            self.idle_mut(id)?.busy = true;
            return Ok(());
        }
        let Some(c) = self.contexts.get_mut(&id) else {
            return Err(KvError::NoContext(id));
        };
        c.busy = false;
        if c.released {
            self.release(id);
        }
        Ok(())
    }

    fn check_free(&self, needed: usize) -> Result<(), KvError> {
        if needed > self.free.len() {
            return Err(KvError::Exhausted {
                needed,
                free: self.free.len(),
                total: self.total_pages(),
            });
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> Vec<PageId> {
        let pages = self.free.split_off(self.free.len() - n);
        for &p in &pages {
            self.refcount[p as usize] = 1;
        }
        pages
    }

    fn unref_all(&mut self, pages: &[PageId]) {
        for &p in pages {
            let rc = &mut self.refcount[p as usize];
            *rc -= 1;
            if *rc == 0 {
                self.free.push(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `tokens` as a pass would: plan, then commit.
    fn write(m: &mut PageManager, id: ContextId, tokens: &[u32]) -> WritePlan {
        let plan = m.prepare_write(id, tokens.len()).unwrap();
        m.commit(id, tokens);
        plan
    }

    #[test]
    fn writes_allocate_pages_and_release_frees_them() {
        let mut m = PageManager::new(8, 4);
        let a = m.create();
        let plan = write(&mut m, a, &[1, 2, 3, 4, 5]);
        assert_eq!(plan.first_pos, 0);
        assert!(plan.replay.is_empty());
        assert_eq!(plan.pages.len(), 2);
        assert_eq!(m.free_pages(), 6);
        let plan = write(&mut m, a, &[6]);
        assert_eq!((plan.first_pos, plan.pages.len()), (5, 2), "fits page 2");
        m.release(a);
        assert_eq!(m.free_pages(), 8);
        assert_eq!(m.tokens(a), Err(KvError::NoContext(a)));
    }

    #[test]
    fn fork_shares_pages_and_copies_the_partial_page_on_write() {
        let mut m = PageManager::new(8, 4);
        let a = m.create();
        write(&mut m, a, &[1, 2, 3, 4, 5, 6]);
        let b = m.fork(a).unwrap();
        assert_eq!(m.pages(a).unwrap(), m.pages(b).unwrap());
        let shared = m.pages(a).unwrap().to_vec();
        assert!(shared.iter().all(|&p| m.refcount(p) == 2));
        assert_eq!(m.free_pages(), 6, "fork allocates nothing");
        assert_eq!(m.replay_len(b).unwrap(), 2);

        // The child writes: its partial page is replaced and replayed.
        let plan = write(&mut m, b, &[7]);
        assert_eq!(plan.first_pos, 4);
        assert_eq!(plan.replay, vec![5, 6]);
        assert_eq!(plan.pages[0], shared[0], "full page still shared");
        assert_ne!(plan.pages[1], shared[1]);
        assert_eq!(m.refcount(shared[0]), 2);
        assert_eq!(m.refcount(shared[1]), 1);
        // The parent now owns its partial page alone: written in place.
        assert_eq!(m.replay_len(a).unwrap(), 0);
        let plan = write(&mut m, a, &[8]);
        assert_eq!((plan.first_pos, plan.pages), (6, shared.clone()));
        assert_eq!(m.tokens(a).unwrap(), &[1, 2, 3, 4, 5, 6, 8]);
        assert_eq!(m.tokens(b).unwrap(), &[1, 2, 3, 4, 5, 6, 7]);

        m.release(a);
        assert_eq!(m.refcount(shared[0]), 1);
        m.release(b);
        assert_eq!(m.free_pages(), 8);
    }

    #[test]
    fn fork_at_a_page_boundary_replays_nothing() {
        let mut m = PageManager::new(8, 4);
        let a = m.create();
        write(&mut m, a, &[1, 2, 3, 4]);
        let b = m.fork(a).unwrap();
        let plan = write(&mut m, b, &[5]);
        assert!(plan.replay.is_empty());
        assert_eq!(plan.first_pos, 4);
        assert_eq!(m.free_pages(), 6);
    }

    #[test]
    fn exhaustion_fails_without_changing_anything() {
        let mut m = PageManager::new(3, 4);
        let a = m.create();
        write(&mut m, a, &[1, 2, 3, 4, 5, 6]);
        let b = m.fork(a).unwrap();
        let before = m.pages(b).unwrap().to_vec();
        // 7 more tokens: the shared partial page copied + 2 new = 3 > 1 free.
        let err = m.prepare_write(b, 7).unwrap_err();
        assert_eq!(
            err,
            KvError::Exhausted {
                needed: 3,
                free: 1,
                total: 3
            }
        );
        assert_eq!(m.pages(b).unwrap(), before);
        assert_eq!(m.free_pages(), 1);
        assert_eq!(
            m.reserve(a, 100).unwrap_err().to_string(),
            "KV cache exhausted: 25 more pages needed, 1 of 3 free"
        );
        // Space freed elsewhere makes the same write possible.
        m.release(a);
        assert_eq!(m.prepare_write(b, 7).unwrap().replay, vec![5, 6]);
    }

    #[test]
    fn trim_releases_whole_pages_and_keeps_sharing_safe() {
        let mut m = PageManager::new(8, 4);
        let a = m.create();
        write(&mut m, a, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let b = m.fork(a).unwrap();
        m.trim(b, 5).unwrap();
        assert_eq!(m.pages(b).unwrap().len(), 2);
        assert_eq!(m.refcount(m.pages(a).unwrap()[2]), 1);
        assert!(matches!(m.trim(b, 6), Err(KvError::TrimPastEnd { .. })));
        // Writing after the trim must not touch a's second page.
        let plan = write(&mut m, b, &[42]);
        assert_eq!(plan.replay, vec![5]);
        assert_ne!(plan.pages[1], m.pages(a).unwrap()[1]);
    }

    #[test]
    fn busy_contexts_refuse_changes_and_free_late() {
        let mut m = PageManager::new(4, 4);
        let a = m.create();
        write(&mut m, a, &[1, 2]);
        m.set_busy(a, true).unwrap();
        assert_eq!(m.fork(a), Err(KvError::Busy(a)));
        assert_eq!(m.trim(a, 0), Err(KvError::Busy(a)));
        m.release(a);
        assert_eq!(m.free_pages(), 3, "pages kept while the pass runs");
        m.set_busy(a, false).unwrap();
        assert_eq!(m.free_pages(), 4);
        assert_eq!(m.num_contexts(), 0);
    }

    #[test]
    fn reserve_then_fork_does_not_share_reserved_pages() {
        let mut m = PageManager::new(8, 4);
        let a = m.create();
        write(&mut m, a, &[1, 2, 3, 4]);
        m.reserve(a, 8).unwrap();
        assert_eq!(m.pages(a).unwrap().len(), 3);
        let b = m.fork(a).unwrap();
        assert_eq!(m.pages(b).unwrap().len(), 1);
        m.release(a);
        m.release(b);
        assert_eq!(m.free_pages(), 8);
    }
}
