//! Advertised routes at the coordinator's API (issue 18): a route carries
//! nothing until approved, an approval reaches the peers' maps as a delta,
//! the policy's `autoApprovers` approve on advertising, and a bad route
//! is refused with a clear error and changes nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{client, expect, first_full};
use ipnet::IpNet;
use warren::control::client::Advertised;
use warren::control::{ControlError, ErrorCode, MapEvent};
use warren::keys::PrivateKey;
use warren_coordinator::store::NewToken;
use warren_coordinator::{admin_policy, admin_routes};

const WITHIN: Duration = Duration::from_secs(2);

fn nets(s: &[&str]) -> Vec<IpNet> {
    s.iter().map(|n| n.parse().unwrap()).collect()
}

#[tokio::test]
async fn a_route_serves_once_approved_and_peers_hear_of_it() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let srv = common::start(dir.path(), None).await;
    let url = common::url(&srv);
    let tok = common::token(&srv.store, true, false).await;
    let router = client(&url, &dir.path().join("r"));
    let lan = nets(&["192.168.50.0/24"]);
    let adv = Advertised {
        tags: None,
        routes: Some(&lan),
    };
    router
        .register_advertising(Some(&tok), "router", PrivateKey::generate().public(), &adv)
        .await
        .unwrap();
    let peer = client(&url, &dir.path().join("p"));
    peer.register(Some(&tok), "laptop", PrivateKey::generate().public())
        .await
        .unwrap();
    let mut stream = peer.map_stream();
    let full = first_full(&mut stream).await;
    let rk = router.node_key();
    // Advertised, not approved: its peers see no route.
    if let Some(p) = full.peers.get(&rk) {
        assert!(p.routes.is_empty(), "{:?}", p.routes);
    }
    let list = admin_routes::route_list(&srv.store, false).await.unwrap();
    assert!(
        list.contains("192.168.50.0/24") && list.contains("pending"),
        "{list}"
    );

    let out = admin_routes::route_change(&srv.store, "router", &lan, true, false)
        .await
        .unwrap();
    assert!(out.contains("serving"), "{out}");
    let routes = expect(&mut stream, WITHIN, |ev| match ev {
        MapEvent::PeerChanged(p) | MapEvent::PeerAdded(p)
            if p.key == rk && !p.routes.is_empty() =>
        {
            Some(p.routes.clone())
        }
        _ => None,
    })
    .await;
    assert_eq!(routes, lan);

    // Rejected again: the route goes from the peers' maps.
    admin_routes::route_change(&srv.store, "router", &lan, false, false)
        .await
        .unwrap();
    expect(&mut stream, WITHIN, |ev| match ev {
        MapEvent::PeerChanged(p) if p.key == rk && p.routes.is_empty() => Some(()),
        _ => None,
    })
    .await;
    // An approval must name canonical routes.
    let bad = admin_routes::route_change(
        &srv.store,
        "router",
        &nets(&["192.168.50.1/24"]),
        true,
        false,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(bad.contains("write 192.168.50.0/24"), "{bad}");
}

#[tokio::test]
async fn bad_advertised_routes_are_refused_and_change_nothing() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let srv = common::start(dir.path(), None).await;
    let url = common::url(&srv);
    let tok = common::token(&srv.store, true, false).await;
    let c = client(&url, &dir.path().join("r"));
    let disco = PrivateKey::generate().public();
    let good = nets(&["10.1.0.0/16"]);
    c.register_advertising(
        Some(&tok),
        "r",
        disco,
        &Advertised {
            tags: None,
            routes: Some(&good),
        },
    )
    .await
    .unwrap();
    let ula = srv.store.list_nodes().await.unwrap()[0].ipv6;
    let inside_ula = format!(
        "{}/64",
        ipnet::Ipv6Net::new(ula, 64).unwrap().trunc().network()
    );
    for (bad, says) in [
        (vec!["10.1.2.3/16"], "host bits"),
        (vec!["100.100.0.0/16"], "overlay"),
        (vec![inside_ula.as_str()], "overlay"),
        (vec!["0.0.0.0/0"], "advertise-exit-node"),
    ] {
        let routes = nets(&bad);
        let err = c
            .register_advertising(
                None,
                "r",
                disco,
                &Advertised {
                    tags: None,
                    routes: Some(&routes),
                },
            )
            .await
            .unwrap_err();
        match &err {
            ControlError::Api { code, message, .. } => {
                assert_eq!(*code, ErrorCode::BadRequest, "{bad:?}");
                assert!(message.contains(says), "{bad:?}: {message}");
            }
            other => panic!("{other}"),
        }
        let n = &srv.store.list_nodes().await.unwrap()[0];
        assert_eq!(n.advertised_routes, good, "{bad:?} changed nothing");
    }
    // Both default routes: an exit node.
    let exit = nets(&["0.0.0.0/0", "::/0"]);
    c.register_advertising(
        None,
        "r",
        disco,
        &Advertised {
            tags: None,
            routes: Some(&exit),
        },
    )
    .await
    .unwrap();
    let n = &srv.store.list_nodes().await.unwrap()[0];
    assert_eq!(n.advertised_routes, exit);
    assert_eq!(admin_routes::served_summary(n), "(2 pending)");
}

#[tokio::test]
async fn auto_approvers_approve_what_the_policy_names_and_no_more() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let srv = common::start(dir.path(), None).await;
    let url = common::url(&srv);
    let policy = r#"{
      "tagOwners": {"tag:router": [], "tag:exit": []},
      "autoApprovers": {
        "routes": {"10.0.0.0/8": ["tag:router"]},
        "exitNode": ["tag:exit"],
      },
      "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
    }"#;
    let file = dir.path().join("policy.hujson");
    std::fs::write(&file, policy).unwrap();
    admin_policy::policy_set(&srv.store, &file, false)
        .await
        .unwrap();
    // The hub polls its store every 200 ms.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let join = |tags: &[&str]| NewToken {
        reusable: true,
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    let router_tok = srv
        .store
        .create_token(&join(&["tag:router"]))
        .await
        .unwrap()
        .1;
    let exit_tok = srv
        .store
        .create_token(&join(&["tag:exit"]))
        .await
        .unwrap()
        .1;
    let wanted = nets(&["10.20.0.0/16", "192.168.9.0/24"]);
    let r = client(&url, &dir.path().join("r"));
    r.register_advertising(
        Some(&router_tok),
        "router",
        PrivateKey::generate().public(),
        &Advertised {
            tags: None,
            routes: Some(&wanted),
        },
    )
    .await
    .unwrap();
    let exit = nets(&["0.0.0.0/0", "::/0"]);
    let e = client(&url, &dir.path().join("e"));
    e.register_advertising(
        Some(&exit_tok),
        "exit",
        PrivateKey::generate().public(),
        &Advertised {
            tags: None,
            routes: Some(&exit),
        },
    )
    .await
    .unwrap();
    // The router may not be an exit node: it advertises one, unapproved.
    r.register_advertising(
        None,
        "router",
        PrivateKey::generate().public(),
        &Advertised {
            tags: None,
            routes: Some(&[wanted.clone(), exit.clone()].concat()),
        },
    )
    .await
    .unwrap();
    let nodes = srv.store.list_nodes().await.unwrap();
    let by = |name: &str| nodes.iter().find(|n| n.name == name).unwrap().clone();
    assert_eq!(by("router").approved_routes, nets(&["10.20.0.0/16"]));
    assert_eq!(by("router").served_routes(), nets(&["10.20.0.0/16"]));
    assert_eq!(by("exit").served_routes(), exit);
    assert_eq!(admin_routes::served_summary(&by("exit")), "exit");
}

/// Routes pending when a policy arrives are approved by its autoApprovers
/// at once, as if advertised then.
#[tokio::test]
async fn a_new_policy_approves_pending_routes_it_covers() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let srv = common::start(dir.path(), None).await;
    let url = common::url(&srv);
    let spec = NewToken {
        reusable: true,
        tags: vec!["tag:router".into()],
        ..Default::default()
    };
    let tok = srv.store.create_token(&spec).await.unwrap().1;
    let routes = nets(&["10.30.0.0/16", "172.16.0.0/12"]);
    let r = client(&url, &dir.path().join("r"));
    r.register_advertising(
        Some(&tok),
        "router",
        PrivateKey::generate().public(),
        &Advertised {
            tags: None,
            routes: Some(&routes),
        },
    )
    .await
    .unwrap();
    assert!(srv.store.list_nodes().await.unwrap()[0]
        .served_routes()
        .is_empty());
    let file = dir.path().join("policy.hujson");
    std::fs::write(
        &file,
        r#"{"tagOwners": {"tag:router": []},
            "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}},
            "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#,
    )
    .unwrap();
    let out = admin_policy::policy_set(&srv.store, &file, false)
        .await
        .unwrap();
    assert!(out.contains("1 pending route(s) approved"), "{out}");
    let n = &srv.store.list_nodes().await.unwrap()[0];
    assert_eq!(n.served_routes(), nets(&["10.30.0.0/16"]));
}
