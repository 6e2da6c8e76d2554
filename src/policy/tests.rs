//! The parser, checker, evaluator and compiler against the examples of
//! Tailscale's policy documentation (users, groups, tags replacing
//! identity, hosts, autogroups, ports, protocols, grants, tests).

use std::net::IpAddr;

use super::eval::Principal;
use super::selector::{ICMP, TCP, UDP};
use super::*;

const INVENTORY: &str = r#"{
  "users": [
    {"name": "alice", "email": "alice@example.com"},
    {"name": "bob", "email": "bob@example.com"},
    {"name": "carol", "email": "carol@example.com"}
  ],
  "nodes": [
    {"name": "alice-laptop", "ipv4": "100.80.0.1", "ipv6": "fd7a:115c:a1e0::1", "user": "alice"},
    {"name": "alice-phone", "ipv4": "100.80.0.2", "ipv6": "fd7a:115c:a1e0::2", "user": "alice"},
    {"name": "bob-laptop", "ipv4": "100.80.0.3", "ipv6": "fd7a:115c:a1e0::3", "user": "bob"},
    {"name": "server", "ipv4": "100.80.0.10", "ipv6": "fd7a:115c:a1e0::a", "user": null, "tags": ["tag:server"]},
    {"name": "router", "ipv4": "100.80.0.20", "ipv6": "fd7a:115c:a1e0::14", "user": null,
     "tags": ["tag:router"], "advertised_routes": ["10.33.0.0/16"], "approved_routes": ["10.33.0.0/16"]}
  ]
}"#;

const POLICY: &str = r#"
// The example policy of the README.
{
  "groups": {
    "group:dev": ["alice@example.com"],
    "group:ops": ["carol@example.com",],
  },
  "tagOwners": {
    "tag:server": ["group:ops"],
    "tag:router": ["group:ops"],
  },
  "hosts": {
    "office": "10.33.0.0/16",
  },
  "acls": [
    {"action": "accept", "src": ["group:dev"], "dst": ["tag:server:22"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
    {"action": "accept", "src": ["group:dev"], "dst": ["office:443"], "proto": "tcp"},
  ],
  "tests": [
    {"src": "alice@example.com", "accept": ["tag:server:22"], "deny": ["tag:server:80"]},
    {"src": "bob@example.com", "deny": ["tag:server:22"]},
  ],
}
"#;

fn inv() -> Inventory {
    Inventory::from_json(INVENTORY).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn flow(proto: u8, src: &str, dst: &str, port: u16) -> filter::Flow {
    filter::Flow {
        proto,
        src: ip(src),
        dst: ip(dst),
        src_port: 50000,
        dst_port: port,
    }
}

fn filter_of(c: &Compiled, inv: &Inventory, node: &str) -> PacketFilter {
    let i = inv.nodes.iter().position(|n| n.name == node).unwrap();
    PacketFilter::new(c.filter(i).to_vec())
}

fn index(inv: &Inventory, node: &str) -> usize {
    inv.nodes.iter().position(|n| n.name == node).unwrap()
}

#[test]
fn the_readme_example_loads_and_its_tests_pass() {
    let p = Policy::load(POLICY, &inv()).unwrap();
    assert_eq!(p.groups.len(), 2);
    assert_eq!(p.rules.len(), 3);
    assert_eq!(p.tests.len(), 2);
}

#[test]
fn groups_tags_and_ports_compile_to_the_servers_filter() {
    let inv = inv();
    let p = Policy::load(POLICY, &inv).unwrap();
    let c = compile(Some(&p), &inv);
    let server = filter_of(&c, &inv, "server");
    assert!(server.allows(&flow(TCP, "100.80.0.1", "100.80.0.10", 22)));
    assert!(server.allows(&flow(TCP, "fd7a:115c:a1e0::2", "fd7a:115c:a1e0::a", 22)));
    assert!(
        !server.allows(&flow(TCP, "100.80.0.1", "100.80.0.10", 80)),
        "port 80"
    );
    assert!(
        !server.allows(&flow(TCP, "100.80.0.3", "100.80.0.10", 22)),
        "bob"
    );
    // Default protocols: ICMP (no ports) is allowed by a port rule.
    assert!(server.allows(&flow(ICMP, "100.80.0.1", "100.80.0.10", 0)));
    // The server may not open anything towards alice.
    let alice = filter_of(&c, &inv, "alice-laptop");
    assert!(!alice.allows(&flow(TCP, "100.80.0.10", "100.80.0.1", 22)));
}

#[test]
fn autogroup_self_allows_a_users_own_devices_only() {
    let inv = inv();
    let p = Policy::load(POLICY, &inv).unwrap();
    let c = compile(Some(&p), &inv);
    let phone = filter_of(&c, &inv, "alice-phone");
    assert!(phone.allows(&flow(UDP, "100.80.0.1", "100.80.0.2", 5353)));
    assert!(
        !phone.allows(&flow(UDP, "100.80.0.3", "100.80.0.2", 5353)),
        "bob"
    );
    assert!(
        !phone.allows(&flow(UDP, "100.80.0.10", "100.80.0.2", 5353)),
        "tagged"
    );
    let bob = filter_of(&c, &inv, "bob-laptop");
    assert!(!bob.allows(&flow(UDP, "100.80.0.1", "100.80.0.3", 1)));
}

#[test]
fn a_tag_replaces_the_users_identity() {
    // carol owns tag:server but the tagged node is not carol's: a rule for
    // carol does not reach it, and a rule for the tag does not reach carol.
    let text = r#"{
      "groups": {"group:ops": ["carol@example.com"]},
      "tagOwners": {"tag:server": ["group:ops"]},
      "acls": [{"action": "accept", "src": ["tag:server"], "dst": ["carol@example.com:*"]},
               {"action": "accept", "src": ["*"], "dst": ["autogroup:tagged:80"]}],
    }"#;
    let mut inv = inv();
    inv.nodes.push(InventoryNode {
        name: "carol-pc".into(),
        ipv4: "100.80.0.30".parse().unwrap(),
        ipv6: "fd7a:115c:a1e0::1e".parse().unwrap(),
        user: Some("carol".into()),
        tags: vec![],
        advertised_routes: vec![],
        approved_routes: vec![],
    });
    let p = Policy::load(text, &inv).unwrap();
    let c = compile(Some(&p), &inv);
    let carol = filter_of(&c, &inv, "carol-pc");
    assert!(carol.allows(&flow(TCP, "100.80.0.10", "100.80.0.30", 1)));
    assert!(
        !carol.allows(&flow(TCP, "100.80.0.1", "100.80.0.30", 80)),
        "not tagged"
    );
    let server = filter_of(&c, &inv, "server");
    assert!(server.allows(&flow(TCP, "100.80.0.1", "100.80.0.10", 80)));
    assert!(!server.allows(&flow(TCP, "100.80.0.1", "100.80.0.10", 81)));
}

#[test]
fn hosts_and_routes_reach_the_router_that_serves_them() {
    let inv = inv();
    let p = Policy::load(POLICY, &inv).unwrap();
    let c = compile(Some(&p), &inv);
    let router = filter_of(&c, &inv, "router");
    assert!(router.allows(&flow(TCP, "100.80.0.1", "10.33.4.5", 443)));
    assert!(
        !router.allows(&flow(UDP, "100.80.0.1", "10.33.4.5", 443)),
        "proto tcp only"
    );
    assert!(
        !router.allows(&flow(TCP, "100.80.0.3", "10.33.4.5", 443)),
        "bob"
    );
    assert!(
        !router.allows(&flow(TCP, "100.80.0.1", "100.80.0.20", 443)),
        "not the router itself"
    );
}

#[test]
fn grants_are_equivalent_to_acls() {
    let acl = r#"{"acls": [{"action": "accept", "src": ["bob@example.com"],
                            "dst": ["100.80.0.10:22,443", "100.80.0.10:8000-8010"]}]}"#;
    let grant = r#"{"grants": [{"src": ["bob@example.com"], "dst": ["100.80.0.10"],
                                 "ip": ["22", "443", "8000-8010"]}]}"#;
    let inv = inv();
    let a = compile(Some(&Policy::load(acl, &inv).unwrap()), &inv);
    let g = compile(Some(&Policy::load(grant, &inv).unwrap()), &inv);
    let (fa, fg) = (filter_of(&a, &inv, "server"), filter_of(&g, &inv, "server"));
    for port in [21, 22, 23, 443, 7999, 8000, 8005, 8010, 8011] {
        for proto in [TCP, UDP] {
            let f = flow(proto, "100.80.0.3", "100.80.0.10", port);
            assert_eq!(fa.allows(&f), fg.allows(&f), "{proto}/{port}");
        }
    }
    let tcp_only = r#"{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["tcp:22", "icmp:*"]}]}"#;
    let t = compile(Some(&Policy::load(tcp_only, &inv).unwrap()), &inv);
    let f = filter_of(&t, &inv, "server");
    assert!(f.allows(&flow(TCP, "100.80.0.3", "100.80.0.10", 22)));
    assert!(!f.allows(&flow(UDP, "100.80.0.3", "100.80.0.10", 22)));
    assert!(f.allows(&flow(ICMP, "100.80.0.3", "100.80.0.10", 0)));
}

#[test]
fn visibility_follows_the_rules_in_both_directions() {
    let inv = inv();
    let p = Policy::load(POLICY, &inv).unwrap();
    let c = compile(Some(&p), &inv);
    let (alice, phone, bob, server, router) = (
        index(&inv, "alice-laptop"),
        index(&inv, "alice-phone"),
        index(&inv, "bob-laptop"),
        index(&inv, "server"),
        index(&inv, "router"),
    );
    assert_eq!(c.visible(alice), vec![phone, server, router]);
    assert_eq!(
        c.visible(server),
        vec![alice, phone],
        "the server sees who may reach it"
    );
    assert_eq!(
        c.visible(bob),
        Vec::<usize>::new(),
        "bob sees nobody but himself"
    );
    assert!(!c.sees(bob, server));
    let open = compile(None, &inv);
    assert_eq!(
        open.visible(bob).len(),
        inv.nodes.len() - 1,
        "no policy: all"
    );
}

#[test]
fn tests_entries_that_fail_refuse_the_policy() {
    let inv = inv();
    let bad = POLICY.replace(
        r#""deny": ["tag:server:80"]"#,
        r#""deny": ["tag:server:22"]"#,
    );
    let err = Policy::load(&bad, &inv).unwrap_err();
    assert!(
        matches!(*err.kind, PolicyErrorKind::TestFailed { .. }),
        "{err}"
    );
    assert_eq!(err.entry, "tests[0]");
    assert_eq!(err.pos.line, 21, "{err}");
    let accept = POLICY.replace(
        r#"{"src": "bob@example.com", "deny""#,
        r#"{"src": "bob@example.com", "accept""#,
    );
    assert!(Policy::load(&accept, &inv).is_err());
}

#[test]
fn names_must_exist_and_errors_give_line_column_and_entry() {
    let inv = inv();
    let cases: &[(&str, u32, &str)] = &[
        (r#"{"acls": [{"action": "accept", "src": ["dave@example.com"], "dst": ["*:*"]}]}"#, 1, "unknown user"),
        ("{\n\"acls\": [\n{\"action\": \"accept\", \"src\": [\"group:nope\"], \"dst\": [\"*:*\"]}]}", 3, "unknown group"),
        (r#"{"acls": [{"action": "accept", "src": ["tag:ghost"], "dst": ["*:*"]}]}"#, 1, "tag without owners"),
        (r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["tag:server"]}]}"#, 1, "no ports"),
        (r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:99999"]}]}"#, 1, "malformed port"),
        (r#"{"acls": [{"action": "deny", "src": ["*"], "dst": ["*:*"]}]}"#, 1, "deny"),
        (r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"], "srcPosture": []}]}"#, 1, "unknown key"),
        ("{\n  \"aclz\": []}", 2, "unknown section"),
        (r#"{"acls": [{"action": "accept", "src": ["autogroup:admin"], "dst": ["*:*"]}]}"#, 1, "unknown autogroup"),
        (r#"{"acls": [{"action": "accept", "src": ["autogroup:self"], "dst": ["*:*"]}]}"#, 1, "self in src"),
        (r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"], "proto": "icmp"}]}"#, 1, "icmp ports"),
        (r#"{"groups": {"group:a": ["group:b"]}}"#, 1, "nested group"),
        (r#"{"grants": [{"src": ["*"], "dst": ["*"], "app": {"x": []}}]}"#, 1, "app grant"),
        (r#"{"hosts": {"db": "10.0.0.1/8"}}"#, 1, "host bits"),
        ("{\"acls\": [\n  {\"action\": \"accept\",, \"src\": []}]}", 2, "syntax"),
    ];
    for (text, line, what) in cases {
        let err = Policy::load(text, &inv).unwrap_err();
        assert_eq!(err.pos.line, *line, "{what}: {err}");
        assert!(err.pos.col >= 1, "{what}");
    }
    let err = Policy::load(cases[0].0, &inv).unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 1, column 40 (acls[0]): no user \"dave@example.com\" in this network (warren-coordinator user list)"
    );
}

#[test]
fn tailscale_sections_warren_does_not_use_are_read_past() {
    let text = r#"{"ssh": [{"action": "check"}], "nodeAttrs": [], "acls": []}"#;
    let p = Policy::load(text, &inv()).unwrap();
    let names: Vec<_> = p.ignored.iter().map(|s| s.value.as_str()).collect();
    assert_eq!(names, ["ssh", "nodeAttrs"]);
}

#[test]
fn explain_names_the_rule_and_addresses_stand_for_their_nodes() {
    let inv = inv();
    let p = Policy::load(POLICY, &inv).unwrap();
    let alice_addr = Principal::Addr(ip("100.80.0.1"));
    let server = Principal::Tag("tag:server".into());
    let r = p
        .allowing_rule(&inv, &alice_addr, &server, TCP, 22)
        .unwrap();
    assert_eq!(r.entry, "acls[0]");
    let phone = Principal::Addr(ip("100.80.0.2"));
    assert_eq!(
        p.allowing_rule(&inv, &alice_addr, &phone, UDP, 9)
            .unwrap()
            .entry,
        "acls[1]"
    );
    let bob = Principal::User("bob@example.com".into());
    assert!(p.allowing_rule(&inv, &bob, &phone, UDP, 9).is_none());
}

#[test]
fn the_auto_approvers_section_is_parsed_and_checked() {
    let text = r#"{
      "groups": {"group:ops": ["carol@example.com"]},
      "tagOwners": {"tag:router": ["group:ops"]},
      "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}, "exitNode": ["group:ops"]},
    }"#;
    let p = Policy::load(text, &inv()).unwrap();
    assert_eq!(
        p.auto_approvers.routes[0].prefix,
        "10.0.0.0/8".parse::<IpNet>().unwrap()
    );
    assert_eq!(p.auto_approvers.exit_node.len(), 1);
    let bad = text.replace("\"tag:router\"]}", "\"*\"]}");
    assert!(
        Policy::load(&bad, &inv()).is_err(),
        "* cannot approve routes"
    );
}

#[test]
fn auto_approvers_approve_the_routes_of_the_nodes_they_name() {
    let text = r#"{
      "groups": {"group:ops": ["carol@example.com"]},
      "tagOwners": {"tag:router": ["group:ops"]},
      "autoApprovers": {
        "routes": {"10.0.0.0/8": ["tag:router"], "192.168.0.0/16": ["alice@example.com"]},
        "exitNode": ["tag:router"],
      },
    }"#;
    let p = Policy::load(text, &inv()).unwrap();
    let nets = |v: &[&str]| -> Vec<IpNet> { v.iter().map(|s| s.parse().unwrap()).collect() };
    let router = ip("100.80.0.20");
    // A part of an approved prefix is approved; one outside, or the
    // prefix's supernet, is not; the router is an exit node too.
    assert_eq!(
        p.auto_approved(
            &inv(),
            router,
            &nets(&[
                "10.33.0.0/16",
                "10.0.0.0/7",
                "172.16.0.0/12",
                "0.0.0.0/0",
                "::/0"
            ])
        ),
        nets(&["10.33.0.0/16", "0.0.0.0/0", "::/0"])
    );
    // Alice's own laptop may route 192.168/16 but not 10/8, and is no exit.
    assert_eq!(
        p.auto_approved(
            &inv(),
            ip("100.80.0.1"),
            &nets(&["192.168.1.0/24", "10.1.0.0/16", "0.0.0.0/0"])
        ),
        nets(&["192.168.1.0/24"])
    );
    // Bob's node: nothing.
    assert!(p
        .auto_approved(&inv(), ip("100.80.0.3"), &nets(&["192.168.1.0/24"]))
        .is_empty());
}

#[test]
fn the_readme_policy_example_is_valid() {
    let readme = include_str!("../../README.md");
    let start = readme.find("```jsonc\n").unwrap() + "```jsonc\n".len();
    let text = &readme[start..][..readme[start..].find("```").unwrap()];
    let p = Policy::load(text, &inv()).unwrap();
    assert_eq!(p.rules.len(), 3);
}

#[test]
fn tag_owners_decide_who_may_advertise_a_tag() {
    let p = Policy::load(POLICY, &inv()).unwrap();
    let carol = Some("carol@example.com");
    assert!(
        p.may_use_tag(carol, &[], "tag:server"),
        "carol is in group:ops"
    );
    assert!(!p.may_use_tag(Some("alice@example.com"), &[], "tag:server"));
    assert!(
        !p.may_use_tag(None, &[], "tag:server"),
        "no user, no owning tag"
    );
    assert!(
        !p.may_use_tag(carol, &[], "tag:nobody"),
        "no entry: nobody's"
    );
}
