//! The access policy at the coordinator's API: advertised tags need an
//! owner in `tagOwners`, a refused registration changes nothing, and a
//! node only sees the peers the policy lets it see.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use warren::control::{ControlError, ErrorCode};
use warren::keys::PrivateKey;
use warren_coordinator::admin_policy;
use warren_coordinator::store::NewToken;

const POLICY: &str = r#"{
  "groups": {"group:ops": ["carol@example.com"]},
  "tagOwners": {"tag:server": ["group:ops"]},
  "acls": [{"action": "accept", "src": ["group:ops"], "dst": ["tag:server:22"]}],
}"#;

#[tokio::test]
async fn advertised_tags_need_an_owner_in_the_policy() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let srv = common::start(dir.path(), None).await;
    let url = common::url(&srv);
    let mut tokens = Vec::new();
    for email in ["alice@example.com", "carol@example.com"] {
        let u = srv.store.create_user(email, None, "").await.unwrap();
        let spec = NewToken {
            reusable: true,
            user_id: Some(u.id),
            ..Default::default()
        };
        tokens.push(srv.store.create_token(&spec).await.unwrap().1);
    }
    let file = dir.path().join("policy.hujson");
    std::fs::write(&file, POLICY).unwrap();
    admin_policy::policy_set(&srv.store, &file, false)
        .await
        .unwrap();
    // The hub polls its store every 200 ms.
    tokio::time::sleep(Duration::from_millis(600)).await;

    let tags = vec!["tag:server".to_owned()];
    let alice = common::client(&url, &dir.path().join("a"));
    let err = alice
        .register_tagged(
            Some(&tokens[0]),
            "alice",
            PrivateKey::generate().public(),
            Some(&tags),
        )
        .await
        .unwrap_err();
    match &err {
        ControlError::Api { code, message, .. } => {
            assert_eq!(*code, ErrorCode::Forbidden);
            assert!(
                message.contains("alice@example.com") && message.contains("tagOwners"),
                "{message}"
            );
        }
        other => panic!("{other}"),
    }
    assert!(
        srv.store.list_nodes().await.unwrap().is_empty(),
        "nothing was stored"
    );

    let carol = common::client(&url, &dir.path().join("c"));
    carol
        .register_tagged(
            Some(&tokens[1]),
            "carol",
            PrivateKey::generate().public(),
            Some(&tags),
        )
        .await
        .unwrap();
    let nodes = srv.store.list_nodes().await.unwrap();
    assert_eq!(nodes[0].advertised_tags, tags);
}
