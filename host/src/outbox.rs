//! Confirmation of republished messages.
//!
//! rumqttc reports that a publish was queued, not that the broker took it.
//! When a reconnect finds no session (the republish connection uses a clean
//! session), it drops the publishes it had not yet sent or that the broker
//! had not yet acknowledged. The outbox keeps every publish until the
//! broker confirms it (PUBACK at QoS 1, PUBCOMP at QoS 2, written to the
//! connection at QoS 0) and hands the unconfirmed ones out again after each
//! reconnect. Only then is the input message acknowledged to its own
//! broker, so a broker restart between the two costs a duplicate at most,
//! never a message.
//!
//! rumqttc chooses the packet ids itself and reports each as an
//! `Outgoing::Publish(pkid)` event, in the order the requests left its
//! channel. The outbox therefore keeps the publishes queued on the current
//! connection in that order and learns each one's packet id from those
//! events. Each connection gets a new rumqttc event loop, and with it a new
//! channel, so that nothing queued on a lost connection is sent twice.
//!
//! Plain state, no I/O: the sink's connection task feeds it the events and
//! sends what it returns.

use std::collections::VecDeque;

/// Number the outbox gives each publish, in the order they were added.
pub type EntryId = u64;

/// State of one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Waiting for a connection.
    Unsent,
    /// In the current connection's request channel, packet id not known yet.
    Queued,
    /// Written with this packet id; waiting for the broker's ack.
    InFlight(u16),
}

#[derive(Debug)]
struct Entry<T> {
    id: EntryId,
    item: T,
    stage: Stage,
}

/// Publishes not yet confirmed, in the order they were added.
#[derive(Debug)]
pub struct Outbox<T> {
    entries: VecDeque<Entry<T>>,
    next_id: EntryId,
    /// Whether a connection is up and takes publishes.
    connected: bool,
    /// At QoS 0 the broker sends no ack, and a publish counts as confirmed
    /// once it was written to the connection.
    qos0: bool,
    /// Packet id of a publish that rumqttc held back because the id was
    /// still in flight; its `Outgoing::Publish` comes later and belongs to
    /// the entry already given that id.
    collided: Option<u16>,
}

impl<T> Outbox<T> {
    pub fn new(qos0: bool) -> Self {
        Self {
            entries: VecDeque::new(),
            next_id: 0,
            connected: false,
            qos0,
            collided: None,
        }
    }

    /// Adds a publish. Returns its id and whether to queue it on the
    /// connection now; when there is no connection, it goes out after the
    /// next one is made.
    pub fn push(&mut self, item: T) -> (EntryId, bool) {
        let id = self.next_id;
        self.next_id += 1;
        let stage = if self.connected {
            Stage::Queued
        } else {
            Stage::Unsent
        };
        self.entries.push_back(Entry { id, item, stage });
        (id, self.connected)
    }

    /// Records a new connection, on which every publish not yet confirmed is
    /// to be queued in the order [`Outbox::iter_mut`] gives. Returns how many.
    pub fn connected(&mut self) -> usize {
        self.connected = true;
        self.collided = None;
        for entry in &mut self.entries {
            entry.stage = Stage::Queued;
        }
        self.entries.len()
    }

    /// Returns every publish not yet confirmed, oldest first.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.entries.iter_mut().map(|entry| &mut entry.item)
    }

    /// Removes and returns the publishes `give_up` picks, while there is no
    /// connection.
    pub fn take_if(&mut self, mut give_up: impl FnMut(&T) -> bool) -> Vec<T> {
        let (taken, kept) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|entry| give_up(&entry.item));
        self.entries = kept;
        taken
            .into_iter()
            .map(|entry: Entry<T>| entry.item)
            .collect()
    }

    /// Records a lost connection, whose request channel and packet ids are
    /// gone with it. Returns how many publishes wait for the next connection.
    pub fn disconnected(&mut self) -> usize {
        self.connected = false;
        self.collided = None;
        for entry in &mut self.entries {
            entry.stage = Stage::Unsent;
        }
        self.entries.len()
    }

    /// Records that the next queued publish was written with `pkid`. Returns
    /// the publish this confirms (QoS 0 only).
    pub fn written(&mut self, pkid: u16) -> Option<T> {
        if self.collided.take_if(|held| *held == pkid).is_some() {
            // The held-back publish went out; its entry has its id already.
            return None;
        }
        let entry = self.entries.iter_mut().find(|e| e.stage == Stage::Queued)?;
        if self.qos0 {
            let id = entry.id;
            return self.remove(id);
        }
        entry.stage = Stage::InFlight(pkid);
        None
    }

    /// rumqttc held a publish back because `pkid` is still in flight; it
    /// writes the publish once that id is acknowledged.
    pub fn held_back(&mut self, pkid: u16) {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.stage == Stage::Queued) {
            entry.stage = Stage::InFlight(pkid);
            self.collided = Some(pkid);
        }
    }

    /// Records the broker's PUBACK or PUBCOMP for `pkid`. Returns the
    /// publish this confirms: the oldest one in flight with that packet id.
    pub fn acknowledged(&mut self, pkid: u16) -> Option<T> {
        let id = self
            .entries
            .iter()
            .find(|e| e.stage == Stage::InFlight(pkid))?
            .id;
        self.remove(id)
    }

    fn remove(&mut self, id: EntryId) -> Option<T> {
        let index = self.entries.iter().position(|e| e.id == id)?;
        self.entries.remove(index).map(|entry| entry.item)
    }

    /// Publishes not yet confirmed.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_wait_for_connection_in_order() {
        let mut outbox = Outbox::new(false);
        assert_eq!(outbox.push('a'), (0, false));
        assert_eq!(outbox.push('b'), (1, false));
        assert_eq!(outbox.connected(), 2);
        assert_eq!(outbox.iter_mut().map(|c| *c).collect::<String>(), "ab");
        assert_eq!(outbox.push('c'), (2, true));
    }

    #[test]
    fn qos1_confirms_on_matching_ack() {
        let mut outbox = Outbox::new(false);
        outbox.connected();
        outbox.push('a');
        outbox.push('b');
        assert_eq!(outbox.written(7), None);
        assert_eq!(outbox.written(8), None);
        assert_eq!(outbox.acknowledged(8), Some('b'));
        assert_eq!(outbox.acknowledged(8), None, "an ack confirms once");
        assert_eq!(outbox.acknowledged(7), Some('a'));
        assert!(outbox.is_empty());
    }

    #[test]
    fn ack_before_write_confirms_nothing() {
        let mut outbox = Outbox::new(false);
        outbox.connected();
        outbox.push('a');
        assert_eq!(outbox.acknowledged(1), None);
        assert_eq!(outbox.len(), 1);
    }

    #[test]
    fn lost_connection_resends_unconfirmed() {
        let mut outbox = Outbox::new(false);
        outbox.connected();
        for item in ['a', 'b', 'c'] {
            outbox.push(item);
        }
        outbox.written(1);
        outbox.written(2);
        assert_eq!(outbox.acknowledged(1), Some('a'));
        // 'b' was written and not acknowledged, 'c' was still queued.
        assert_eq!(outbox.disconnected(), 2);
        // Acks of the lost connection's packet ids confirm nothing now.
        assert_eq!(outbox.acknowledged(2), None);
        assert_eq!(outbox.push('d'), (3, false));
        assert_eq!(outbox.connected(), 3);
        assert_eq!(outbox.iter_mut().map(|c| *c).collect::<String>(), "bcd");
        // The new connection numbers its packet ids from the start.
        outbox.written(1);
        outbox.written(2);
        outbox.written(3);
        assert_eq!(outbox.acknowledged(1), Some('b'));
        assert_eq!(outbox.acknowledged(3), Some('d'));
        assert_eq!(outbox.acknowledged(2), Some('c'));
        assert!(outbox.is_empty());
    }

    #[test]
    fn publishes_given_up_leave_the_rest_in_order() {
        let mut outbox = Outbox::new(false);
        for item in ['a', 'b', 'c', 'd'] {
            outbox.push(item);
        }
        assert_eq!(outbox.take_if(|c| *c == 'b' || *c == 'd'), vec!['b', 'd']);
        assert_eq!(outbox.connected(), 2);
        assert_eq!(outbox.iter_mut().map(|c| *c).collect::<String>(), "ac");
    }

    #[test]
    fn qos0_confirms_once_written() {
        let mut outbox = Outbox::new(true);
        outbox.push('a');
        outbox.connected();
        outbox.push('b');
        assert_eq!(outbox.written(0), Some('a'));
        assert_eq!(outbox.disconnected(), 1);
        outbox.connected();
        assert_eq!(outbox.written(0), Some('b'));
        assert!(outbox.is_empty());
    }

    #[test]
    fn held_back_publish_keeps_its_place() {
        let mut outbox = Outbox::new(false);
        outbox.connected();
        outbox.push('a');
        outbox.push('b');
        outbox.push('c');
        outbox.written(1);
        // 'b' gets packet id 1 too, held back while 'a' is in flight.
        outbox.held_back(1);
        assert_eq!(outbox.acknowledged(1), Some('a'));
        // rumqttc now writes 'b'; that event must not be taken for 'c'.
        assert_eq!(outbox.written(1), None);
        outbox.written(2);
        assert_eq!(outbox.acknowledged(2), Some('c'));
        assert_eq!(outbox.acknowledged(1), Some('b'));
        assert!(outbox.is_empty());
    }
}
