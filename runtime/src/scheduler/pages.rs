//! KV pages and the contexts that hold them.
//!
//! Pages are reference-counted: a fork shares every page of its parent, and
//! a page is copied only when a context is about to write into a page that
//! another context also holds (copy on write: the [`WritePlan`] lists the
//! copies the driver makes before the pass).
//!
//! Models with recurrent layers (Gated DeltaNet, Mamba2) also keep one row
//! of recurrent state per context, taken at its first write. A fork copies
//! the parent's row (queued here, made by the driver before the next
//! batch); such a context cannot be trimmed, since its state cannot be
//! rewound. Every method checks before it changes anything: an error leaves
//! the manager as it was.

use super::ids::IdMap;

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
    #[error(
        "cannot trim context {id} from {have} to {len} tokens: the model has recurrent layers, \
         whose state cannot be rewound (fork before the tokens you may want to drop instead)"
    )]
    RecurrentTrim {
        id: ContextId,
        len: usize,
        have: usize,
    },
    #[error(
        "recurrent state exhausted: all {total} state rows are held by contexts \
         (raise max_recurrent_contexts or release contexts)"
    )]
    StateExhausted { total: usize },
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
    /// Recurrent state row, for models with recurrent layers, once the
    /// context has been written to (or forked from one that was).
    state: Option<u32>,
}

/// Where a write of new tokens goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritePlan {
    /// Position of the first new token (the context's length).
    pub first_pos: usize,
    /// `(from, to)` pages to copy before the write: shared pages in the
    /// write range, replaced by private copies.
    pub copies: Vec<(PageId, PageId)>,
    /// The page table covering every position through the write.
    pub pages: Vec<PageId>,
    /// The context's recurrent state row (0 for models without one).
    pub state: u32,
}

#[derive(Debug)]
pub struct PageManager {
    page_size: usize,
    refcount: Vec<u32>,
    /// Free pages; popped from the end.
    free: Vec<PageId>,
    contexts: IdMap<Context>,
    next_id: ContextId,
    /// Free recurrent state rows (None: the model has no recurrent layers).
    free_states: Option<Vec<u32>>,
    state_rows: usize,
    /// `(from, to)` state rows to copy before the next batch (forks).
    state_copies: Vec<(u32, u32)>,
}

impl PageManager {
    pub fn new(num_pages: usize, page_size: usize) -> Self {
        PageManager {
            page_size: page_size.max(1),
            refcount: vec![0; num_pages],
            free: (0..num_pages as PageId).rev().collect(),
            contexts: IdMap::default(),
            next_id: 1,
            free_states: None,
            state_rows: 0,
            state_copies: Vec::new(),
        }
    }

    /// A manager that also hands out `rows` recurrent state rows, one per
    /// context (models with recurrent layers).
    pub fn with_state_rows(mut self, rows: usize) -> Self {
        self.free_states = Some((0..rows as u32).rev().collect());
        self.state_rows = rows;
        self
    }

    pub fn is_recurrent(&self) -> bool {
        self.free_states.is_some()
    }

    /// State rows not held by any context.
    pub fn free_state_rows(&self) -> usize {
        self.free_states.as_ref().map_or(0, Vec::len)
    }

    /// The state copies forks queued since the last call; the driver must
    /// make them, in order, before the next batch runs.
    pub fn take_state_copies(&mut self) -> Vec<(u32, u32)> {
        std::mem::take(&mut self.state_copies)
    }

    fn take_state_row(&mut self) -> Result<u32, KvError> {
        let total = self.state_rows;
        self.free_states
            .as_mut()
            .and_then(Vec::pop)
            .ok_or(KvError::StateExhausted { total })
    }

    fn free_state_row(&mut self, row: Option<u32>) {
        if let (Some(row), Some(free)) = (row, self.free_states.as_mut()) {
            free.push(row);
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

    /// A new context sharing the pages that hold `id`'s tokens (and a copy
    /// of its recurrent state).
    pub fn fork(&mut self, id: ContextId) -> Result<ContextId, KvError> {
        let page_size = self.page_size;
        let parent = self.idle_mut(id)?;
        let tokens = parent.tokens.clone();
        let parent_state = parent.state;
        // Pages reserved past the last token are not shared: the child
        // would write into them too.
        let pages: Vec<PageId> = parent.pages[..tokens.len().div_ceil(page_size)].to_vec();
        let state = match parent_state {
            Some(from) => {
                let to = self.take_state_row()?;
                self.state_copies.push((from, to));
                Some(to)
            }
            None => None,
        };
        for &p in &pages {
            self.refcount[p as usize] += 1;
        }
        let child = self.create();
        let c = self.contexts.get_mut(&child).expect("just created");
        c.tokens = tokens;
        c.pages = pages;
        c.state = state;
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
        self.free_state_row(c.state);
    }

    /// Keeps the first `len` tokens and the pages they need.
    pub fn trim(&mut self, id: ContextId, len: usize) -> Result<(), KvError> {
        let page_size = self.page_size;
        let recurrent = self.is_recurrent();
        let c = self.idle_mut(id)?;
        let have = c.tokens.len();
        if len > have {
            return Err(KvError::TrimPastEnd { id, len, have });
        }
        if recurrent && len < have {
            return Err(KvError::RecurrentTrim { id, len, have });
        }
        c.tokens.truncate(len);
        let keep = len.div_ceil(page_size).min(c.pages.len());
        let dropped = c.pages.split_off(keep);
        self.unref_all(&dropped);
        Ok(())
    }

    /// Cuts a context back to `len` tokens even while it is busy: the
    /// scheduler undoing a failed pass. A recurrent state cannot be cut
    /// back, so such a context is emptied (its next pass starts over).
    /// Returns the length it was cut to.
    pub fn rollback(&mut self, id: ContextId, len: usize) -> usize {
        let page_size = self.page_size;
        let len = if self.is_recurrent() { 0 } else { len };
        let Some(c) = self.contexts.get_mut(&id) else {
            return len;
        };
        c.tokens.truncate(len);
        let keep = c.tokens.len().div_ceil(page_size).min(c.pages.len());
        let dropped = c.pages.split_off(keep);
        let state = if len == 0 { c.state.take() } else { None };
        self.unref_all(&dropped);
        self.free_state_row(state);
        len
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

    /// Makes the pages for writing `n` new tokens after `id`'s tokens
    /// private and present: shared pages in the write range are replaced by
    /// copies, missing pages allocated; a recurrent context gets its state
    /// row at its first write.
    pub fn prepare_write(&mut self, id: ContextId, n: usize) -> Result<WritePlan, KvError> {
        let ps = self.page_size;
        let c = self.get(id)?;
        let len = c.tokens.len();
        let needs_state = self.is_recurrent() && c.state.is_none();
        let (first, last) = (len / ps, (len + n).div_ceil(ps));
        let shared: Vec<usize> = (first..last.min(c.pages.len()))
            .filter(|&i| self.refcount[c.pages[i] as usize] > 1)
            .collect();
        let missing = last.saturating_sub(c.pages.len());
        self.check_free(shared.len() + missing)?;
        if needs_state && self.free_state_rows() == 0 {
            return Err(KvError::StateExhausted {
                total: self.state_rows,
            });
        }
        let state = match needs_state {
            true => Some(self.take_state_row().expect("checked")),
            false => None,
        };
        let fresh = self.take(shared.len() + missing);
        let (swap, append) = fresh.split_at(shared.len());
        let c = self.contexts.get_mut(&id).expect("checked");
        if state.is_some() {
            c.state = state;
        }
        let mut copies = Vec::with_capacity(swap.len());
        for (&i, &p) in shared.iter().zip(swap) {
            copies.push((std::mem::replace(&mut c.pages[i], p), p));
        }
        c.pages.extend_from_slice(append);
        let plan = WritePlan {
            first_pos: len,
            copies,
            pages: c.pages.clone(),
            state: c.state.unwrap_or(0),
        };
        // The replaced pages stay held by the contexts sharing them, so
        // they keep their contents until the copies are made.
        let old: Vec<PageId> = plan.copies.iter().map(|c| c.0).collect();
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
        assert!(plan.copies.is_empty());
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

        // The child writes: its partial page is replaced by a copy.
        let plan = write(&mut m, b, &[7]);
        assert_eq!(plan.first_pos, 6);
        assert_eq!(plan.pages[0], shared[0], "full page still shared");
        assert_ne!(plan.pages[1], shared[1]);
        assert_eq!(plan.copies, vec![(shared[1], plan.pages[1])]);
        assert_eq!(m.refcount(shared[0]), 2);
        assert_eq!(m.refcount(shared[1]), 1);
        // The parent now owns its partial page alone: written in place.
        let plan = write(&mut m, a, &[8]);
        assert!(plan.copies.is_empty());
        assert_eq!((plan.first_pos, plan.pages), (6, shared.clone()));
        assert_eq!(m.tokens(a).unwrap(), &[1, 2, 3, 4, 5, 6, 8]);
        assert_eq!(m.tokens(b).unwrap(), &[1, 2, 3, 4, 5, 6, 7]);

        m.release(a);
        assert_eq!(m.refcount(shared[0]), 1);
        m.release(b);
        assert_eq!(m.free_pages(), 8);
    }

    #[test]
    fn fork_at_a_page_boundary_copies_nothing() {
        let mut m = PageManager::new(8, 4);
        let a = m.create();
        write(&mut m, a, &[1, 2, 3, 4]);
        let b = m.fork(a).unwrap();
        let plan = write(&mut m, b, &[5]);
        assert!(plan.copies.is_empty());
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
        // Once the parent is gone the partial page is b's alone: a write
        // filling it and one more page needs no copy.
        m.release(a);
        assert!(m.prepare_write(b, 3).unwrap().copies.is_empty());
        assert_eq!(m.free_pages(), 0);
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
        let a1 = m.pages(a).unwrap()[1];
        let plan = write(&mut m, b, &[42]);
        assert_eq!(plan.copies, vec![(a1, plan.pages[1])]);
        assert_ne!(plan.pages[1], a1);
    }

    #[test]
    fn recurrent_contexts_take_state_rows_and_forks_copy_them() {
        let mut m = PageManager::new(8, 4).with_state_rows(2);
        let a = m.create();
        assert_eq!(m.free_state_rows(), 2, "rows are taken at the first write");
        let plan = write(&mut m, a, &[1, 2, 3]);
        let row_a = plan.state;
        assert_eq!(m.free_state_rows(), 1);
        let b = m.fork(a).unwrap();
        let copies = m.take_state_copies();
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].0, row_a);
        let row_b = write(&mut m, b, &[4]).state;
        assert_eq!(row_b, copies[0].1);
        assert_ne!(row_a, row_b);
        // No row left: a third context cannot start, a fork cannot copy.
        let c = m.create();
        assert_eq!(
            m.prepare_write(c, 1),
            Err(KvError::StateExhausted { total: 2 })
        );
        assert_eq!(m.fork(a), Err(KvError::StateExhausted { total: 2 }));
        assert_eq!(m.free_pages(), 8 - 2, "the refused writes took nothing");
        // Trimming would need the state rewound.
        assert!(matches!(m.trim(a, 1), Err(KvError::RecurrentTrim { .. })));
        m.trim(a, 3).unwrap();
        // A failed pass empties a recurrent context and frees its row.
        assert_eq!(m.rollback(b, 3), 0);
        assert!(m.tokens(b).unwrap().is_empty());
        assert_eq!(m.free_state_rows(), 1);
        m.release(a);
        assert_eq!(m.free_state_rows(), 2);
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
