//! Lab tests of the relay as the agents use it: the fallback that always
//! works. Two agents behind random-port (EDM) NATs, behind gateways that
//! let only TCP 443 out, and behind a gateway whose only way out is an HTTP
//! proxy (tinyproxy), once with the default transport (the HTTP upgrade
//! inside `CONNECT`) and once with agents set to WebSocket: each time a ping
//! and a 50 MB checksummed transfer go through the coordinator's embedded
//! relay, `warren status` says so, and the relay's counters say which path
//! the agents came in by.

use crate::lab;

use std::time::Duration;

use lab::agent::{tcp_transfer, Agent, AgentConfig};
use lab::coord::{relay_metrics, relay_metrics_status_anonymous, Coordinator};
use lab::mesh::up_pair;
use lab::nat::Nat;
use lab::{poll_until, Lab, Node};

const TRANSFER: usize = 50 << 20;

/// Joins both, pings, checks the path is the relay, moves 50 MB.
fn relayed_pair(lab: &Lab, coord: &Coordinator, a: &Agent, b: &Agent) {
    let ip_b = up_pair(lab, coord, a, b);
    assert!(
        lab.ping_within(&a.node, &ip_b, Duration::from_secs(5)),
        "{}",
        a.cli(lab, &["status"]).stdout
    );
    let st = a.status(lab);
    let path = &st["peers"][0]["path"];
    assert_eq!(path["kind"], "relay", "{st}");
    assert_eq!(path["region"], "default", "status names the region: {st}");
    let text = a.cli(lab, &["status"]).expect_ok("status").stdout;
    assert!(text.contains("relay default"), "{text}");
    let (sent, got) = tcp_transfer(lab, &a.node, &b.node, ip_b.parse().unwrap(), 5201, TRANSFER);
    assert_eq!(sent, got, "50 MB arrive intact through the relay");
}

#[test]
fn two_random_edm_nats_talk_through_the_relay() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let coord = Coordinator::start(&lab, &lab.public("coord"), &[]);
    let a = behind(&lab, "a", Nat::Edm);
    let b = behind(&lab, "b", Nat::Edm);
    let (a, b) = (mesh_agent(&lab, &a), mesh_agent(&lab, &b));
    relayed_pair(&lab, &coord, &a, &b);
    let st = a.status(&lab);
    assert_eq!(st["mesh"]["home_relay_connected"], true, "{st}");
    // Who is connected and how much they send is not for anyone who asks:
    // without the metrics token, a host off the relay's loopback is refused.
    let status = relay_metrics_status_anonymous(&lab, &coord.node, &coord.url());
    assert_eq!(status, "401");
}

#[test]
fn udp_blocked_on_both_sides_works_over_tcp_443() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let coord = Coordinator::start(&lab, &lab.public("coord"), &[]);
    let a = behind(&lab, "a", Nat::UdpBlocked);
    let b = behind(&lab, "b", Nat::UdpBlocked);
    let (a, b) = (mesh_agent(&lab, &a), mesh_agent(&lab, &b));
    relayed_pair(&lab, &coord, &a, &b);
    // Netcheck saw that UDP is blocked, and says so.
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
            a.status(&lab)["mesh"]["udp"] == false
        }),
        "{}",
        a.status(&lab)
    );
    let report = a.cli(&lab, &["netcheck"]).expect_ok("netcheck").stdout;
    assert!(report.contains("UDP: no"), "{report}");
    // Only TCP 443 gets out, and the STUN server's TCP port is not 443.
    assert!(report.contains("TCP: no answer"), "{report}");
}

#[test]
fn through_an_http_proxy_only() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let coord = Coordinator::start(&lab, &lab.public("coord"), &[]);
    let (a, b) = proxied_pair(&lab, &coord, &[]);
    relayed_pair(&lab, &coord, &a, &b);
    // The default transport got through: the HTTP upgrade inside CONNECT.
    let m = relay_metrics(&lab, &coord.node, &coord.url());
    assert_eq!(m["connections_websocket"], 0, "{m}");
    assert!(m["connections_upgrade"].as_u64() >= Some(2), "{m}");
}

#[test]
fn websocket_through_an_http_proxy_only() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let coord = Coordinator::start(&lab, &lab.public("coord"), &[]);
    let (a, b) = proxied_pair(&lab, &coord, &["relay_transport = \"websocket\""]);
    relayed_pair(&lab, &coord, &a, &b);
    // Both agents entered over WebSocket and never over the upgrade, and
    // the 50 MB went through the relay.
    let m = relay_metrics(&lab, &coord.node, &coord.url());
    assert_eq!(m["connections_upgrade"], 0, "{m}");
    assert!(m["connections_websocket"].as_u64() >= Some(2), "{m}");
    assert!(
        m["bytes_out"].as_u64() > Some(TRANSFER as u64),
        "the transfer went through the relay: {m}"
    );
    let log = lab.log(a.proc);
    assert!(
        !log.contains("switching to WebSocket"),
        "no fallback was needed"
    );
}

/// Two agents behind gateways whose only way out is tinyproxy on the
/// gateway, given to the agents as `HTTPS_PROXY`; `agent_extra` goes into
/// their `[agent]` section.
fn proxied_pair(lab: &Lab, coord: &Coordinator, agent_extra: &[&str]) -> (Agent, Agent) {
    let mut agents = Vec::new();
    for name in ["a", "b"] {
        // Nothing from the LAN is forwarded: the proxy on the gateway is
        // the only way out.
        let gw = lab.gateway(&format!("g{name}"), Nat::UdpBlocked);
        lab.filter_first(&gw, &["iifname", "lan", "drop"]);
        let lan_ip = gw.lan.as_ref().unwrap().router;
        let conf = lab.write_file(
            &format!("tinyproxy-{name}.conf"),
            &format!(
                "Port 8888\nListen {lan_ip}\nTimeout 600\nMaxClients 50\nAllow 10.0.0.0/8\n\
                 ConnectPort 443\nLogLevel Info\n"
            ),
        );
        let conf = conf.to_string_lossy().into_owned();
        lab.spawn(
            &gw,
            &format!("tinyproxy-{name}"),
            &["tinyproxy", "-d", "-c", &conf],
        );
        let host = lab.host_behind(&gw, name);
        let proxy = format!("http://{lan_ip}:8888");
        let env = [
            format!("HTTPS_PROXY={proxy}"),
            format!("HTTP_PROXY={proxy}"),
        ];
        let env: Vec<&str> = env.iter().map(String::as_str).collect();
        // The proxy is up once it accepts connections.
        assert!(poll_until(
            Duration::from_secs(10),
            Duration::from_millis(100),
            || {
                lab.exec(&host, &["nc", "-z", "-w", "1", &lan_ip.to_string(), "8888"])
                    .ok()
            }
        ));
        let mut cfg = AgentConfig::mesh(lab, &host);
        cfg.agent_extra = agent_extra.iter().map(|s| s.to_string()).collect();
        agents.push(Agent::start_with_env(lab, &host, &cfg, &env));
    }
    // Without the proxy there is no way out at all.
    let direct = lab.exec(
        &agents[0].node,
        &["nc", "-z", "-w", "1", &coord.ip.to_string(), "443"],
    );
    assert!(!direct.ok(), "the gateway must not forward anything");
    let b = agents.pop().unwrap();
    let a = agents.pop().unwrap();
    (a, b)
}

fn behind(lab: &Lab, name: &str, nat: Nat) -> Node {
    let gw = lab.gateway(&format!("g{name}"), nat);
    lab.host_behind(&gw, name)
}

fn mesh_agent(lab: &Lab, node: &Node) -> Agent {
    Agent::start(lab, node, &AgentConfig::mesh(lab, node))
}
