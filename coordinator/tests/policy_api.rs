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

/// `GET /reach` answers, from the peers' filters, what each peer in the
/// asking node's map lets it do; without a policy it says there is none.
#[tokio::test]
async fn reach_says_what_each_peer_lets_the_node_do() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let srv = common::start(dir.path(), None).await;
    let url = common::url(&srv);
    let carol_user = srv
        .store
        .create_user("carol@example.com", None, "")
        .await
        .unwrap();
    let alice_user = srv
        .store
        .create_user("alice@example.com", None, "")
        .await
        .unwrap();
    let join = |user: Option<i64>, tags: &[&str]| NewToken {
        reusable: true,
        user_id: user,
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    let specs = [
        ("carol", join(Some(carol_user.id), &[])),
        ("alice", join(Some(alice_user.id), &[])),
        ("server", join(None, &["tag:server"])),
    ];
    let mut clients = Vec::new();
    for (name, spec) in &specs {
        let token = srv.store.create_token(spec).await.unwrap().1;
        let c = common::client(&url, &dir.path().join(name));
        c.register(Some(&token), name, PrivateKey::generate().public())
            .await
            .unwrap();
        clients.push(c);
    }
    let open = clients[1].reach().await.unwrap();
    assert!(!open.policy && open.peers.is_empty(), "{open:?}");

    let file = dir.path().join("policy.hujson");
    std::fs::write(&file, POLICY).unwrap();
    admin_policy::policy_set(&srv.store, &file, false)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;

    let carol = clients[0].reach().await.unwrap();
    assert!(carol.policy);
    assert_eq!(carol.peers.len(), 1, "{carol:?}");
    assert_eq!(carol.peers[0].key, clients[2].node_key());
    let allows: Vec<String> = carol.peers[0]
        .allows
        .iter()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(allows, ["icmp", "tcp/22", "udp/22", "ipv6-icmp"]);
    let server = clients[2].reach().await.unwrap();
    assert_eq!(server.peers.len(), 1);
    assert!(
        server.peers[0].allows.is_empty(),
        "carol allows the server nothing"
    );
    let alice = clients[1].reach().await.unwrap();
    assert!(
        alice.policy && alice.peers.is_empty(),
        "alice is in no rule"
    );

    let stranger = common::client(&url, &dir.path().join("x"));
    let err = stranger.reach().await.unwrap_err();
    assert!(matches!(err, ControlError::Api { .. }), "{err}");
}
