//! The change pipeline end to end: SQL typed into PostgreSQL reaches WebSocket
//! subscribers through the WAL, with the right rows, to the right people.

mod common;

use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dba_sql_insert_update_delete_truncate_arrive_live_with_old_and_new_rows() {
    let t = TestServer::start().await;
    let owner = user(&t.sql, "owner@example.com").await;
    bucket(&t.sql, "files", false).await;
    let mut ws = t.ws(Some(&service_token())).await;
    ws.subscribe(
        "s1",
        json!({"schema": "public", "table": "files", "event": "*"}),
    )
    .await;

    t.exec(&format!(
        "INSERT INTO public.files (bucket_id, path, name, size, mime_type, owner_id)
         VALUES ('files', 'a.txt', 'a.txt', 3, 'text/plain', '{owner}')"
    ))
    .await;
    let ins = ws.change().await;
    assert_eq!(ins["subscription"], "s1");
    assert_eq!(ins["eventType"], "INSERT");
    assert_eq!(
        (ins["schema"].as_str(), ins["table"].as_str()),
        (Some("public"), Some("files"))
    );
    assert_eq!(ins["new"]["name"], "a.txt");
    assert_eq!(ins["new"]["size"], 3);
    assert_eq!(ins["new"]["owner_id"], owner.as_str());
    assert_eq!(ins["old"], Value::Null);
    assert!(ins["timestamp"].as_i64().unwrap() > 1_700_000_000_000);
    let created = ins["new"]["created_at"].as_str().unwrap();
    assert!(
        created.ends_with('Z') && created.contains('T'),
        "ISO-8601: {created}"
    );

    t.exec("UPDATE public.files SET name = 'b.txt', size = 4")
        .await;
    let upd = ws.change().await;
    assert_eq!(upd["eventType"], "UPDATE");
    assert_eq!(upd["new"]["name"], "b.txt");
    assert_eq!(upd["old"]["name"], "a.txt");
    assert_eq!(upd["old"]["size"], 3);
    assert_eq!(upd["old"]["mime_type"], "text/plain", "old row is complete");
    assert!(
        upd["id"].as_str().unwrap() > ins["id"].as_str().unwrap(),
        "ids increase in commit order"
    );

    t.exec("DELETE FROM public.files").await;
    let del = ws.change().await;
    assert_eq!(del["eventType"], "DELETE");
    assert_eq!(del["new"], Value::Null);
    assert_eq!(del["old"]["name"], "b.txt");
    assert_eq!(del["old"]["bucket_id"], "files");

    t.exec(&format!(
        "INSERT INTO public.files (bucket_id, path, name, owner_id) VALUES ('files', 'c', 'c', '{owner}');
         TRUNCATE public.files"
    ))
    .await;
    assert_eq!(ws.change().await["eventType"], "INSERT");
    let tr = ws.change().await;
    assert_eq!(tr["eventType"], "TRUNCATE");
    assert_eq!(tr["table"], "files");
    assert_eq!(
        (tr["new"].clone(), tr["old"].clone()),
        (Value::Null, Value::Null)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_row_transaction_arrives_in_order_with_ordinals() {
    let t = TestServer::start().await;
    bucket(&t.sql, "pub", true).await;
    let mut ws = t.ws(Some(&service_token())).await;
    ws.subscribe("s", json!({"table": "files"})).await;
    t.exec(
        "BEGIN;
         INSERT INTO public.files (bucket_id, path, name, size) SELECT 'pub', 'f' || i, 'f' || i, i FROM generate_series(1, 50) i;
         COMMIT;
         INSERT INTO public.files (bucket_id, path, name, size) VALUES ('pub', 'last', 'last', 0);",
    )
    .await;
    let mut ids = Vec::new();
    for i in 1..=50 {
        let c = ws.change().await;
        assert_eq!(c["new"]["size"], i);
        ids.push(c["id"].as_str().unwrap().to_owned());
    }
    let last = ws.change().await;
    assert_eq!(last["new"]["name"], "last");
    ids.push(last["id"].as_str().unwrap().to_owned());
    let lsn_of = |id: &str| id.split('-').next().unwrap().to_owned();
    assert!(
        ids[..50].iter().all(|id| lsn_of(id) == lsn_of(&ids[0])),
        "one transaction, one commit LSN"
    );
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing ids"
    );
}
