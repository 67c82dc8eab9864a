use super::*;

fn message(topic: &str, payload: &[u8]) -> Message {
    Message {
        topic: topic.to_owned(),
        payload: payload.to_vec(),
        qos: Qos::AtLeastOnce,
        retain: false,
        received_at_ms: 1_749_133_800_123,
        headers: Vec::new(),
    }
}

fn letter(
    pipeline: &str,
    stage: &str,
    kind: FailureKind,
    topic: &str,
    payload: &[u8],
) -> DeadLetter {
    DeadLetter::new(
        pipeline.to_owned(),
        stage.to_owned(),
        kind,
        format!("{stage} said no"),
        message(topic, payload),
    )
}

fn temp_store() -> (tempfile::TempDir, DeadLetterStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = DeadLetterStore::open(&dir.path().join("dead-letters.sqlite")).unwrap();
    (dir, store)
}

fn ids(letters: &[StoredDeadLetter]) -> Vec<i64> {
    letters.iter().map(|l| l.id).collect()
}

/// Six letters over two pipelines, three stages and three kinds.
fn fill(store: &DeadLetterStore) {
    let letters = [
        letter(
            "telemetry",
            "validate-format",
            FailureKind::Invalid,
            "devices/a/telemetry",
            b"1",
        ),
        letter(
            "telemetry",
            "validate-format",
            FailureKind::Invalid,
            "devices/b/telemetry",
            b"2",
        ),
        letter(
            "telemetry",
            "enrich",
            FailureKind::Trap,
            "devices/a/telemetry",
            b"3",
        ),
        letter(
            "alerts",
            "validate-format",
            FailureKind::Invalid,
            "alerts/a",
            b"4",
        ),
        letter(
            "alerts",
            "sink:republish",
            FailureKind::Sink,
            "alerts/b",
            b"5",
        ),
        letter(
            "telemetry",
            "enrich",
            FailureKind::Timeout,
            "devices/c/telemetry",
            b"6",
        ),
    ];
    store.append(&letters.iter().collect::<Vec<_>>()).unwrap();
}

#[test]
fn round_trip_keeps_exact_bytes() {
    let (_dir, store) = temp_store();
    let mut first = letter(
        "telemetry",
        "validate-format",
        FailureKind::Invalid,
        "devices/x/telemetry",
        &[0xff, 0xfe, 0x00, b'a'],
    );
    first.message.qos = Qos::ExactlyOnce;
    first.message.retain = true;
    first.message.headers = vec![
        ("device_id".to_owned(), "x".to_owned()),
        ("note".to_owned(), "a\"b\nc".to_owned()),
    ];
    first.reason = "payload is not valid UTF-8".to_owned();
    let second = letter(
        "telemetry",
        "sink:file",
        FailureKind::Sink,
        "devices/y/telemetry",
        b"{\"ok\":true}",
    );

    let before = crate::clock::now_ms();
    store.append(&[&first, &second]).unwrap();
    let after = crate::clock::now_ms();

    let stored = store.list(&ListFilter::default()).unwrap();
    assert_eq!(stored.len(), 2);
    let got = &stored[0];
    assert_eq!(got.pipeline, "telemetry");
    assert_eq!(got.stage, "validate-format");
    assert_eq!(got.kind, FailureKind::Invalid);
    assert_eq!(got.reason, "payload is not valid UTF-8");
    assert_eq!(got.topic.as_deref(), Some("devices/x/telemetry"));
    assert_eq!(got.topic_bytes, b"devices/x/telemetry");
    assert_eq!(got.payload, [0xff, 0xfe, 0x00, b'a']);
    assert_eq!(got.qos, Qos::ExactlyOnce);
    assert!(got.retain);
    assert_eq!(got.received_at_ms, 1_749_133_800_123);
    assert_eq!(got.headers, first.message.headers);
    assert_eq!(got.replay_count, 0);
    assert_eq!(got.last_replayed_at_ms, None);
    assert!(
        (before..=after).contains(&got.stored_at_ms),
        "stored_at_ms {}",
        got.stored_at_ms
    );
    let rebuilt = got.message().unwrap();
    assert_eq!(rebuilt.topic, first.message.topic);
    assert_eq!(rebuilt.payload, first.message.payload);
    assert_eq!(rebuilt.qos, first.message.qos);
    assert_eq!(rebuilt.retain, first.message.retain);
    assert_eq!(rebuilt.received_at_ms, first.message.received_at_ms);
    assert_eq!(rebuilt.headers, first.message.headers);

    assert_eq!(stored[1].payload, b"{\"ok\":true}");
    assert_eq!(stored[1].kind, FailureKind::Sink);
    assert!(stored[1].id > got.id, "ids grow in storing order");
    assert_eq!(store.get(got.id).unwrap().as_ref(), Some(got));
    assert_eq!(store.get(9999).unwrap(), None);
}

#[test]
fn json_has_text_and_base64() {
    let (_dir, store) = temp_store();
    let text = letter("p", "s", FailureKind::Invalid, "t", b"not json");
    let binary = letter("p", "s", FailureKind::Invalid, "t", &[0xff]);
    store.append(&[&text, &binary]).unwrap();
    let stored = store.list(&ListFilter::default()).unwrap();

    let json = stored[0].to_json();
    assert_eq!(json["payload_text"], "not json");
    assert_eq!(json["payload_base64"], "bm90IGpzb24=");
    assert_eq!(json["topic"], "t");
    assert_eq!(json["qos"], 1);
    assert_eq!(json["received_at"], "2025-06-05T14:30:00.123Z");
    assert_eq!(json["last_replayed_at"], serde_json::Value::Null);

    let json = stored[1].to_json();
    assert_eq!(
        json.get("payload_text"),
        None,
        "no text for a payload that is not UTF-8"
    );
    assert_eq!(json["payload_base64"], "/w==");
}

#[test]
fn non_utf8_topic_is_null_with_bytes() {
    let (_dir, store) = temp_store();
    let raw_topic = b"devices/\xff/telemetry".to_vec();
    let mut undecodable = letter(
        "telemetry",
        "source",
        FailureKind::Undecodable,
        &String::from_utf8_lossy(&raw_topic),
        b"{}",
    );
    undecodable.topic_bytes = Some(raw_topic.clone());
    store.append(&[&undecodable]).unwrap();

    let stored = store.list(&ListFilter::default()).unwrap();
    assert_eq!(stored[0].topic, None);
    assert_eq!(stored[0].topic_bytes, raw_topic);
    assert_eq!(stored[0].kind, FailureKind::Undecodable);
    assert!(
        stored[0].message().is_none(),
        "no plugin can take a topic that is not UTF-8"
    );
    assert_eq!(stored[0].to_json()["topic"], serde_json::Value::Null);

    let by_prefix = ListFilter {
        topic_prefix: Some("devices/".to_owned()),
        ..ListFilter::default()
    };
    assert_eq!(
        store.count(&by_prefix).unwrap(),
        1,
        "the prefix is matched on the topic's bytes"
    );
}

#[test]
fn filters_select_rows() {
    let (_dir, store) = temp_store();
    fill(&store);
    let all = store.list(&ListFilter::default()).unwrap();
    let id = |index: usize| all[index].id;
    let select = |filter: ListFilter| ids(&store.list(&filter).unwrap());

    assert_eq!(all.len(), 6);
    assert_eq!(
        select(ListFilter {
            pipeline: Some("alerts".into()),
            ..Default::default()
        }),
        [id(3), id(4)]
    );
    assert_eq!(
        select(ListFilter {
            stage: Some("enrich".into()),
            ..Default::default()
        }),
        [id(2), id(5)]
    );
    assert_eq!(
        select(ListFilter {
            kind: Some(FailureKind::Invalid),
            ..Default::default()
        }),
        [id(0), id(1), id(3)]
    );
    assert_eq!(
        select(ListFilter {
            topic_prefix: Some("devices/a/".into()),
            ..Default::default()
        }),
        [id(0), id(2)]
    );
    assert_eq!(
        select(ListFilter {
            pipeline: Some("telemetry".into()),
            stage: Some("enrich".into()),
            kind: Some(FailureKind::Timeout),
            ..Default::default()
        }),
        [id(5)]
    );
    assert_eq!(
        select(ListFilter {
            limit: Some(2),
            ..Default::default()
        }),
        [id(0), id(1)]
    );
    assert_eq!(
        select(ListFilter {
            limit: Some(2),
            after_id: Some(id(1)),
            ..Default::default()
        }),
        [id(2), id(3)]
    );
    assert_eq!(
        select(ListFilter {
            pipeline: Some("nope".into()),
            ..Default::default()
        }),
        Vec::<i64>::new()
    );

    assert_eq!(store.count(&ListFilter::default()).unwrap(), 6);
    assert_eq!(
        store
            .count(&ListFilter {
                kind: Some(FailureKind::Invalid),
                ..Default::default()
            })
            .unwrap(),
        3
    );
    assert_eq!(
        store
            .count(&ListFilter {
                limit: Some(2),
                ..Default::default()
            })
            .unwrap(),
        2
    );
    assert_eq!(
        store.pipelines(&ListFilter::default()).unwrap(),
        ["alerts", "telemetry"]
    );
    assert_eq!(store.last_id().unwrap(), Some(id(5)));
}

#[test]
fn topic_prefix_has_no_wildcards() {
    let (_dir, store) = temp_store();
    let letters = [
        letter("p", "s", FailureKind::Invalid, "a%b/1", b""),
        letter("p", "s", FailureKind::Invalid, "axb/2", b""),
        letter("p", "s", FailureKind::Invalid, "a_b/3", b""),
    ];
    store.append(&letters.iter().collect::<Vec<_>>()).unwrap();
    let count = |prefix: &str| {
        store
            .count(&ListFilter {
                topic_prefix: Some(prefix.to_owned()),
                ..Default::default()
            })
            .unwrap()
    };
    assert_eq!(count("a%"), 1);
    assert_eq!(count("a_"), 1);
    assert_eq!(count("a"), 3);
    assert_eq!(count(""), 3);
}

#[test]
fn purge_deletes_matching_rows() {
    let (_dir, store) = temp_store();
    fill(&store);

    assert_eq!(
        store
            .purge(&ListFilter {
                pipeline: Some("alerts".into()),
                ..Default::default()
            })
            .unwrap(),
        2
    );
    assert_eq!(store.count(&ListFilter::default()).unwrap(), 4);
    assert_eq!(
        store
            .purge(&ListFilter {
                pipeline: Some("alerts".into()),
                ..Default::default()
            })
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .purge(&ListFilter {
                limit: Some(1),
                ..Default::default()
            })
            .unwrap(),
        1
    );
    assert_eq!(store.count(&ListFilter::default()).unwrap(), 3);
    assert_eq!(store.purge(&ListFilter::default()).unwrap(), 3);
    assert_eq!(store.count(&ListFilter::default()).unwrap(), 0);
    assert_eq!(store.last_id().unwrap(), None);
}

#[test]
fn delete_counts_existing_ids() {
    let (_dir, store) = temp_store();
    fill(&store);
    let all = ids(&store.list(&ListFilter::default()).unwrap());

    assert_eq!(store.delete(&[all[0], all[2], 9999]).unwrap(), 2);
    assert_eq!(
        ids(&store.list(&ListFilter::default()).unwrap()),
        [all[1], all[3], all[4], all[5]]
    );
    assert_eq!(store.delete(&[]).unwrap(), 0);
}

#[test]
fn ids_are_not_reused() {
    let (_dir, store) = temp_store();
    fill(&store);
    let last = store.last_id().unwrap().unwrap();
    store.delete(&[last]).unwrap();
    store
        .append(&[&letter("p", "s", FailureKind::Invalid, "t", b"")])
        .unwrap();
    assert_eq!(store.last_id().unwrap(), Some(last + 1));
}

#[test]
fn append_batch_is_all_or_nothing() {
    let (dir, store) = temp_store();
    // A trigger that rejects one letter makes the second insert of the
    // batch fail after the first one succeeded.
    let other = Connection::open(dir.path().join("dead-letters.sqlite")).unwrap();
    other
        .execute_batch(
            "CREATE TRIGGER reject_poison BEFORE INSERT ON dead_letters WHEN NEW.reason = 'poison' \
             BEGIN SELECT RAISE(ABORT, 'poisoned'); END;",
        )
        .unwrap();
    let good = letter("p", "s", FailureKind::Invalid, "t", b"good");
    let mut poison = letter("p", "s", FailureKind::Invalid, "t", b"poison");
    poison.reason = "poison".to_owned();

    let error = store.append(&[&good, &poison]).unwrap_err();
    assert!(
        error
            .to_string()
            .ends_with("dead-letters.sqlite: cannot insert a dead letter: poisoned"),
        "{error}"
    );
    assert_eq!(
        store.count(&ListFilter::default()).unwrap(),
        0,
        "the first letter was rolled back"
    );

    store.append(&[&good]).unwrap();
    assert_eq!(
        store.count(&ListFilter::default()).unwrap(),
        1,
        "the store works after a failed batch"
    );
}

#[test]
fn reopen_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/folder/dead-letters.sqlite");
    let store = DeadLetterStore::open(&path).unwrap();
    fill(&store);
    let before = store.list(&ListFilter::default()).unwrap();
    drop(store);

    let store = DeadLetterStore::open_existing(&path).unwrap();
    assert_eq!(store.list(&ListFilter::default()).unwrap(), before);

    let connection = store.lock();
    let version: i64 = connection
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .unwrap();
    let mode: String = connection
        .pragma_query_value(None, "journal_mode", |row| row.get(0))
        .unwrap();
    let synchronous: i64 = connection
        .pragma_query_value(None, "synchronous", |row| row.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    assert_eq!(mode, "wal");
    assert_eq!(synchronous, 2, "2 is FULL");
}

#[test]
fn second_connection_sees_appends() {
    let (dir, host) = temp_store();
    let cli = DeadLetterStore::open_existing(&dir.path().join("dead-letters.sqlite")).unwrap();
    fill(&host);
    assert_eq!(cli.count(&ListFilter::default()).unwrap(), 6);
    assert_eq!(
        cli.purge(&ListFilter {
            pipeline: Some("alerts".into()),
            ..Default::default()
        })
        .unwrap(),
        2
    );
    assert_eq!(host.count(&ListFilter::default()).unwrap(), 4);
}

#[test]
fn concurrent_appends_all_land() {
    let (_dir, store) = temp_store();
    let store = std::sync::Arc::new(store);
    let threads: Vec<_> = (0..4)
        .map(|thread| {
            let store = store.clone();
            std::thread::spawn(move || {
                for index in 0..25 {
                    let payload = format!("{thread}-{index}");
                    store
                        .append(&[&letter(
                            "p",
                            "s",
                            FailureKind::Invalid,
                            "t",
                            payload.as_bytes(),
                        )])
                        .unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(store.count(&ListFilter::default()).unwrap(), 100);
}

#[test]
fn mark_replayed_records_new_failure() {
    let (_dir, store) = temp_store();
    fill(&store);
    let first = store.list(&ListFilter::default()).unwrap()[0].clone();
    let failure = ReplayFailure {
        id: first.id,
        stage: "sanity-filter".to_owned(),
        kind: FailureKind::Transient,
        reason: "still down".to_owned(),
    };

    let before = crate::clock::now_ms();
    assert_eq!(
        store.mark_replayed(std::slice::from_ref(&failure)).unwrap(),
        1
    );
    let missing = ReplayFailure {
        id: 9999,
        ..failure.clone()
    };
    assert_eq!(
        store.mark_replayed(&[failure, missing]).unwrap(),
        1,
        "a missing id is not counted"
    );

    let after = store.get(first.id).unwrap().unwrap();
    assert_eq!(after.replay_count, 2);
    assert_eq!(after.stage, "sanity-filter");
    assert_eq!(after.kind, FailureKind::Transient);
    assert_eq!(after.reason, "still down");
    assert!(after.last_replayed_at_ms.unwrap() >= before);
    assert_eq!(after.payload, first.payload, "the message is unchanged");
    assert_eq!(after.stored_at_ms, first.stored_at_ms);
}

#[test]
fn json_lines_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dead-letters.jsonl");
    std::fs::write(
        &path,
        "{\"pipeline\":\"telemetry\",\"stage\":\"validate-format\",\"kind\":\"invalid\"}\n",
    )
    .unwrap();
    let error = DeadLetterStore::open(&path)
        .err()
        .expect("a JSON-lines file is no store");
    assert_eq!(
        error.to_string(),
        format!(
            "{} is not an SQLite database; dead_letters.path must name an SQLite file, for example \
             dead-letters.sqlite (the JSON-lines dead-letter files of earlier versions are not read)",
            path.display()
        )
    );
}

#[test]
fn newer_schema_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dead-letters.sqlite");
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 3)
        .unwrap();
    let error = DeadLetterStore::open(&path)
        .err()
        .expect("version 3 is newer");
    assert_eq!(
        error.to_string(),
        format!(
            "dead-letter store {} has schema version 3, but this eliot reads version 2; use the eliot version \
             that wrote it",
            path.display()
        )
    );
}

#[test]
fn open_existing_needs_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.sqlite");
    let error = DeadLetterStore::open_existing(&path)
        .err()
        .expect("no file");
    assert_eq!(
        error.to_string(),
        format!("dead-letter store {} does not exist", path.display())
    );
    assert!(!path.exists(), "open_existing creates nothing");
}

/// `eliot demo` deletes the database file of the previous run, which may
/// leave its WAL behind after a crash. SQLite deletes the WAL of an empty
/// database instead of replaying it.
#[test]
fn orphaned_wal_is_not_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dead-letters.sqlite");
    let wal = dir.path().join("dead-letters.sqlite-wal");
    let saved_wal = dir.path().join("saved-wal");

    // Keep a copy of a WAL that contains the schema and six letters, as a
    // crash would leave it, then delete the database.
    let store = DeadLetterStore::open(&path).unwrap();
    fill(&store);
    std::fs::copy(&wal, &saved_wal).unwrap();
    assert!(
        std::fs::metadata(&saved_wal).unwrap().len() > 0,
        "the WAL holds the letters"
    );
    drop(store);
    std::fs::remove_file(&path).unwrap();
    std::fs::copy(&saved_wal, &wal).unwrap();

    let store = DeadLetterStore::open(&path).unwrap();
    assert_eq!(
        store.count(&ListFilter::default()).unwrap(),
        0,
        "the new store starts empty"
    );
    store
        .append(&[&letter("p", "s", FailureKind::Invalid, "t", b"")])
        .unwrap();
    assert_eq!(store.count(&ListFilter::default()).unwrap(), 1);
}

/// Opens a second store on the same file, as `eliot dead-letters` in
/// another process does.
fn second_store(store: &DeadLetterStore) -> DeadLetterStore {
    DeadLetterStore::open_existing(store.path()).unwrap()
}

const CLAIMED_AT_MS: u64 = 1_749_133_800_000;

#[test]
fn claim_skips_letters_held_elsewhere() {
    let (_dir, store) = temp_store();
    fill(&store);
    let all = ids(&store.list(&ListFilter::default()).unwrap());
    let other = second_store(&store);

    let first = store.claim(&all[..3], "api", CLAIMED_AT_MS).unwrap();
    assert_eq!(ids(&first.letters), &all[..3]);
    assert!(first.claimed_by_others.is_empty(), "{first:?}");
    assert!(first.missing.is_empty(), "{first:?}");
    assert!(first.taken_over.is_empty(), "{first:?}");

    // The other process gets only the letter that no replay has claimed.
    let second = other
        .claim(&all[2..4], "cli", CLAIMED_AT_MS + 1000)
        .unwrap();
    assert_eq!(ids(&second.letters), [all[3]]);
    assert_eq!(
        second.claimed_by_others,
        [ReplayClaim {
            id: all[2],
            claimer: "api".to_owned(),
            claimed_at_ms: CLAIMED_AT_MS,
        }]
    );

    // Once released, the letter can be claimed again. Claims of other
    // replays stay.
    assert_eq!(other.release(&all[..4], "cli").unwrap(), 1);
    assert_eq!(store.release(&[all[2]], "api").unwrap(), 1);
    let third = other
        .claim(&all[2..4], "cli", CLAIMED_AT_MS + 2000)
        .unwrap();
    assert_eq!(ids(&third.letters), &all[2..4]);
    let fourth = store
        .claim(&all[..2], "cli-2", CLAIMED_AT_MS + 3000)
        .unwrap();
    assert!(fourth.letters.is_empty(), "{fourth:?}");
    assert_eq!(fourth.claimed_by_others.len(), 2);
}

#[test]
fn claim_reports_missing_and_repeats() {
    let (_dir, store) = temp_store();
    fill(&store);
    let all = ids(&store.list(&ListFilter::default()).unwrap());
    store.delete(&[all[1]]).unwrap();

    let claimed = store
        .claim(&[all[0], all[1], all[0], 9999], "api", CLAIMED_AT_MS)
        .unwrap();
    assert_eq!(ids(&claimed.letters), [all[0]], "a repeated id counts once");
    assert_eq!(claimed.missing, [all[1], 9999]);
    assert_eq!(
        store.missing(&[all[0], all[1], 9999]).unwrap(),
        [all[1], 9999]
    );
}

#[test]
fn expired_claim_is_taken_over() {
    let (_dir, store) = temp_store();
    fill(&store);
    let id = ids(&store.list(&ListFilter::default()).unwrap())[0];
    let expiry_ms = CLAIM_EXPIRY.as_millis() as u64;
    store.claim(&[id], "died", CLAIMED_AT_MS).unwrap();

    let at_expiry = store
        .claim(&[id], "next", CLAIMED_AT_MS + expiry_ms - 1)
        .unwrap();
    assert!(at_expiry.letters.is_empty(), "the claim still holds");

    let after = store
        .claim(&[id], "next", CLAIMED_AT_MS + expiry_ms)
        .unwrap();
    assert_eq!(ids(&after.letters), [id]);
    assert_eq!(
        after.taken_over,
        [ReplayClaim {
            id,
            claimer: "died".to_owned(),
            claimed_at_ms: CLAIMED_AT_MS,
        }]
    );
}

#[test]
fn renewed_claim_does_not_expire() {
    let (_dir, store) = temp_store();
    fill(&store);
    let id = ids(&store.list(&ListFilter::default()).unwrap())[0];
    let expiry_ms = CLAIM_EXPIRY.as_millis() as u64;
    store.claim(&[id], "slow", CLAIMED_AT_MS).unwrap();
    assert_eq!(
        store
            .renew_claims("slow", CLAIMED_AT_MS + expiry_ms - 1)
            .unwrap(),
        1
    );

    let other = store
        .claim(&[id], "next", CLAIMED_AT_MS + expiry_ms)
        .unwrap();
    assert!(other.letters.is_empty(), "{other:?}");
}

#[test]
fn version_1_file_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dead-letters.sqlite");
    // The schema of version 1, with one row.
    let old = Connection::open(&path).unwrap();
    old.execute_batch(
        "CREATE TABLE dead_letters (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            stored_at_ms INTEGER NOT NULL,
            pipeline TEXT NOT NULL,
            stage TEXT NOT NULL,
            kind TEXT NOT NULL,
            reason TEXT NOT NULL,
            topic TEXT,
            topic_bytes BLOB NOT NULL,
            payload BLOB NOT NULL,
            qos INTEGER NOT NULL CHECK (qos IN (0, 1, 2)),
            retain INTEGER NOT NULL CHECK (retain IN (0, 1)),
            received_at_ms INTEGER NOT NULL,
            headers TEXT NOT NULL,
            replay_count INTEGER NOT NULL DEFAULT 0,
            last_replayed_at_ms INTEGER
        );
        CREATE INDEX dead_letters_by_origin ON dead_letters (pipeline, stage, kind);
        INSERT INTO dead_letters (stored_at_ms, pipeline, stage, kind, reason, topic, topic_bytes, payload, qos,
            retain, received_at_ms, headers, replay_count)
        VALUES (1, 'telemetry', 'validate-format', 'invalid', 'no', 't', X'74', X'7b7d', 1, 0, 2, '[]', 3);
        PRAGMA user_version = 1;",
    )
    .unwrap();
    drop(old);

    let store = DeadLetterStore::open_existing(&path).unwrap();
    let letters = store.list(&ListFilter::default()).unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].payload, b"{}");
    assert_eq!(letters[0].replay_count, 3);
    let claimed = store.claim(&[letters[0].id], "api", CLAIMED_AT_MS).unwrap();
    assert_eq!(claimed.letters, letters);
    drop(store);

    let version: i64 = Connection::open(&path)
        .unwrap()
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    // Opening the migrated file again changes nothing.
    assert_eq!(
        DeadLetterStore::open_existing(&path)
            .unwrap()
            .list(&ListFilter::default())
            .unwrap(),
        letters
    );
}

#[test]
fn removed_file_reopened_before_append() {
    let (dir, store) = temp_store();
    let path = dir.path().join("dead-letters.sqlite");
    let first = letter(
        "telemetry",
        "enrich",
        FailureKind::Trap,
        "devices/a/telemetry",
        b"1",
    );
    store.append(&[&first]).unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let second = letter(
        "telemetry",
        "enrich",
        FailureKind::Trap,
        "devices/b/telemetry",
        b"2",
    );
    store.append(&[&second]).unwrap();

    // A second reader, as the CLI is, finds the new letter in the new file.
    let reader = DeadLetterStore::open_existing(&path).unwrap();
    let letters = reader.list(&ListFilter::default()).unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].message().unwrap().payload, b"2");
}

#[test]
fn foreign_database_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.sqlite");
    let other = Connection::open(&path).unwrap();
    other
        .execute_batch("CREATE TABLE readings (id INTEGER PRIMARY KEY, value REAL);")
        .unwrap();
    drop(other);
    let before = std::fs::read(&path).unwrap();

    for result in [
        DeadLetterStore::open(&path),
        DeadLetterStore::open_existing(&path),
    ] {
        let error = result
            .err()
            .expect("a foreign database is refused")
            .to_string();
        assert!(
            error.contains("is an SQLite database of something else"),
            "{error}"
        );
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file is unchanged"
    );
}
