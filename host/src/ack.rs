//! Acknowledgement ordering.
//!
//! MQTT 3.1.1 (section 4.6) requires a client to send PUBACKs in the order
//! the PUBLISH packets arrived, and some brokers (rumqttd) close the
//! connection on an ack out of order. Pipelines finish messages out of order
//! (workers run in parallel, one message can feed several pipelines), so the
//! tracker holds a finished message back until every earlier one finished.

use std::collections::VecDeque;

/// Sequence number the tracker assigns to a message on arrival.
pub type Sequence = u64;

/// Releases items in arrival order once each is finished. Plain state, no
/// I/O: the source registers, the sink tasks finish, and whoever finishes
/// sends what is released.
#[derive(Debug)]
pub struct AckTracker<T> {
    /// Sequence number of `slots[0]`.
    head: Sequence,
    /// One slot per registered, not yet released item; `done` items wait
    /// for the ones before them.
    slots: VecDeque<Slot<T>>,
}

#[derive(Debug)]
struct Slot<T> {
    item: Option<T>,
    done: bool,
}

impl<T> Default for AckTracker<T> {
    fn default() -> Self {
        Self {
            head: 0,
            slots: VecDeque::new(),
        }
    }
}

impl<T> AckTracker<T> {
    /// Registers an arriving item and returns its sequence number.
    pub fn register(&mut self, item: T) -> Sequence {
        self.slots.push_back(Slot {
            item: Some(item),
            done: false,
        });
        self.head + self.slots.len() as Sequence - 1
    }

    /// Marks `sequence` finished and returns every item that can now be
    /// acknowledged, in arrival order. Finishing an unknown or already
    /// finished sequence returns nothing.
    pub fn finish(&mut self, sequence: Sequence) -> Vec<T> {
        let Some(index) = sequence.checked_sub(self.head) else {
            return Vec::new();
        };
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return Vec::new();
        };
        slot.done = true;

        let mut released = Vec::new();
        while self.slots.front().is_some_and(|slot| slot.done) {
            let slot = self.slots.pop_front().expect("front exists");
            self.head += 1;
            released.extend(slot.item);
        }
        released
    }

    /// Forgets every registered item without releasing it, and returns how
    /// many there were. Their sequence numbers become unknown, so finishing
    /// one later releases nothing and holds nothing back. Used when the
    /// connection that delivered them is gone: their packet ids mean
    /// nothing to the next connection.
    pub fn abandon_all(&mut self) -> usize {
        let abandoned = self.slots.len();
        self.head += abandoned as Sequence;
        self.slots.clear();
        abandoned
    }

    /// Items registered and not yet released.
    pub fn pending(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_finish_releases_at_once() {
        let mut tracker = AckTracker::default();
        let a = tracker.register('a');
        let b = tracker.register('b');
        assert_eq!(tracker.finish(a), vec!['a']);
        assert_eq!(tracker.finish(b), vec!['b']);
        assert_eq!(tracker.pending(), 0);
    }

    #[test]
    fn out_of_order_finish_waits_for_earlier() {
        let mut tracker = AckTracker::default();
        let a = tracker.register('a');
        let b = tracker.register('b');
        let c = tracker.register('c');
        assert_eq!(tracker.finish(c), Vec::<char>::new());
        assert_eq!(tracker.finish(b), Vec::<char>::new());
        assert_eq!(tracker.pending(), 3);
        assert_eq!(tracker.finish(a), vec!['a', 'b', 'c']);
        assert_eq!(tracker.pending(), 0);
    }

    #[test]
    fn gap_in_the_middle_holds_the_rest() {
        let mut tracker = AckTracker::default();
        let seqs: Vec<Sequence> = (0..5).map(|i| tracker.register(i)).collect();
        assert_eq!(tracker.finish(seqs[0]), vec![0]);
        assert_eq!(tracker.finish(seqs[2]), Vec::<i32>::new());
        assert_eq!(tracker.finish(seqs[4]), Vec::<i32>::new());
        assert_eq!(tracker.finish(seqs[1]), vec![1, 2]);
        assert_eq!(tracker.finish(seqs[3]), vec![3, 4]);
    }

    #[test]
    fn repeated_or_unknown_finish_is_ignored() {
        let mut tracker = AckTracker::default();
        let a = tracker.register('a');
        let b = tracker.register('b');
        assert_eq!(tracker.finish(a), vec!['a']);
        assert_eq!(tracker.finish(a), Vec::<char>::new());
        assert_eq!(tracker.finish(99), Vec::<char>::new());
        assert_eq!(tracker.finish(b), vec!['b']);
    }

    #[test]
    fn abandoned_items_release_nothing_and_block_nothing() {
        let mut tracker = AckTracker::default();
        let a = tracker.register('a');
        let b = tracker.register('b');
        assert_eq!(tracker.finish(b), Vec::<char>::new());
        assert_eq!(tracker.abandon_all(), 2);
        assert_eq!(tracker.pending(), 0);
        // Finishing an abandoned item later releases nothing.
        assert_eq!(tracker.finish(a), Vec::<char>::new());
        // New items are not held back by the abandoned ones.
        let c = tracker.register('c');
        assert!(c > b);
        assert_eq!(tracker.finish(c), vec!['c']);
    }

    #[test]
    fn sequences_keep_growing_after_release() {
        let mut tracker = AckTracker::default();
        let a = tracker.register(1);
        tracker.finish(a);
        let b = tracker.register(2);
        assert_eq!(b, a + 1);
        assert_eq!(tracker.finish(b), vec![2]);
    }
}
