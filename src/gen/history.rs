//! The bounded undo list a note source keeps so the generator can roll back what it decoded
//! ahead: one snapshot per step, the oldest forgotten first.

use std::collections::VecDeque;

/// Steps of history kept (the generator rolls back at most its decode-ahead).
pub const HISTORY: usize = 512;

#[derive(Debug)]
pub struct History<T> {
    steps: VecDeque<T>,
}

impl<T> Default for History<T> {
    fn default() -> Self {
        History {
            steps: VecDeque::with_capacity(HISTORY),
        }
    }
}

impl<T> History<T> {
    /// Records the state from before a step.
    pub fn push(&mut self, before: T) {
        if self.steps.len() == HISTORY {
            self.steps.pop_front();
        }
        self.steps.push_back(before);
    }

    /// The state from before the step `back` steps ago, forgetting it and everything after;
    /// `None` (and nothing forgotten) when history does not reach that far.
    pub fn back(&mut self, back: usize) -> Option<T> {
        let keep = self.steps.len().checked_sub(back)?;
        let snap = self.steps.drain(keep..).next();
        snap
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    pub fn clear(&mut self) {
        self.steps.clear();
    }

    /// The oldest state still kept.
    pub fn oldest(&self) -> Option<&T> {
        self.steps.front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_steps_and_goes_back_exactly() {
        let mut h = History::default();
        for s in 0..HISTORY + 10 {
            h.push(s);
        }
        assert_eq!(h.len(), HISTORY);
        assert_eq!(h.oldest(), Some(&10));
        assert_eq!(h.back(3), Some(HISTORY + 7));
        assert_eq!(h.len(), HISTORY - 3);
        assert_eq!(h.back(HISTORY), None);
        assert_eq!(h.len(), HISTORY - 3, "a refused rollback forgets nothing");
    }
}
