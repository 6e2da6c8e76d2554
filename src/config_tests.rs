//! Tests of the config file: parsing, defaults, and errors that name the
//! line and the key.

use super::*;

const KEY: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
const PUB: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

fn parse(s: &str) -> Result<Config, ConfigError> {
    Config::parse(s, Path::new("warren.toml"))
}

#[test]
fn full_config_parses_with_defaults() {
    let c = parse(&format!(
        "[interface]\nprivate_key = \"{KEY}\"\naddresses = [\"100.64.0.1/24\", \"fd00::1/64\"]\n\n\
         [[peer]]\npublic_key = \"{PUB}\"\nallowed_ips = [\"100.64.0.2/32\"]\nendpoint = \"11.11.0.2:51820\"\npersistent_keepalive = 25\n"
    ))
    .unwrap();
    assert_eq!(c.interface.name, "warren0");
    assert_eq!(c.interface.mtu, DEFAULT_MTU);
    assert_eq!(c.interface.listen_port, DEFAULT_PORT);
    assert!(c.interface.offload);
    assert_eq!(c.interface.addresses.len(), 2);
    assert_eq!(c.peers.len(), 1);
    assert_eq!(c.peers[0].persistent_keepalive, Some(25));
    assert_eq!(c.private_key().unwrap().public().to_string(), PUB);
    assert_eq!(c.agent.socket, Path::new("/run/warren/warren.sock"));
}

fn invalid(s: &str) -> (usize, String, String) {
    match parse(s) {
        Err(ConfigError::Invalid {
            line, key, message, ..
        }) => (line, key, message),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn bad_value_names_line_and_key() {
    let (line, key, msg) = invalid(&format!(
        "[interface]\nprivate_key = \"{KEY}\"\nmtu = \"big\"\n"
    ));
    assert_eq!((line, key.as_str()), (3, "interface.mtu"), "{msg}");
}

#[test]
fn unknown_key_names_line() {
    let (line, key, msg) = invalid(&format!(
        "[interface]\nprivate_key = \"{KEY}\"\n\n[[peer]]\npublic_key = \"{PUB}\"\nendpont = \"1.2.3.4:5\"\n"
    ));
    assert_eq!(line, 6, "{key}: {msg}");
    assert!(msg.contains("endpont"), "{msg}");
}

#[test]
fn bad_key_in_second_peer() {
    let (line, key, msg) = invalid(&format!(
        "[interface]\nprivate_key = \"{KEY}\"\n[[peer]]\npublic_key = \"{PUB}\"\n[[peer]]\npublic_key = \"short\"\n"
    ));
    assert_eq!((line, key.as_str()), (6, "peer[1].public_key"));
    assert!(msg.contains("base64") || msg.contains("32 bytes"), "{msg}");
}

#[test]
fn bad_endpoint_and_cidr() {
    let (line, key, _) = invalid(&format!(
        "[interface]\nprivate_key = \"{KEY}\"\n[[peer]]\npublic_key = \"{PUB}\"\nendpoint = \"nowhere\"\n"
    ));
    assert_eq!((line, key.as_str()), (5, "peer[0].endpoint"));
    let (line, key, _) = invalid(&format!(
        "[interface]\nprivate_key = \"{KEY}\"\naddresses = [\"100.64.0.1/99\"]\n"
    ));
    assert_eq!(line, 3);
    assert!(key.starts_with("interface.addresses"), "{key}");
}

#[test]
fn syntax_error_has_line() {
    let (line, _, _) = invalid("[interface]\nprivate_key = \n");
    assert_eq!(line, 2);
}

#[test]
fn semantic_errors_are_located() {
    let (line, key, _) = invalid(&format!(
        "[interface]\nprivate_key = \"{KEY}\"\nmtu = 100\n"
    ));
    assert_eq!((line, key.as_str()), (3, "interface.mtu"));
    let (line, key, _) = invalid(&format!(
        "[interface]\nprivate_key = \"{KEY}\"\n[[peer]]\npublic_key = \"{PUB}\"\n[[peer]]\npublic_key = \"{PUB}\"\n"
    ));
    assert_eq!((line, key.as_str()), (6, "peer[1].public_key"));
}

#[test]
fn without_a_key_the_node_key_is_made_in_the_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let c = parse(&format!("[agent]\nstate_dir = \"{}\"\n", state.display())).unwrap();
    let k1 = c.private_key().unwrap();
    let k2 = c.private_key().unwrap();
    assert_eq!(k1.public(), k2.public(), "made once, then reused");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state.join(NODE_KEY_FILE)), 0o600);
    assert_eq!(mode(&state), 0o700);
}

#[test]
fn bad_interface_names() {
    for name in ["a/b", "a b", "x:y", "..", "sixteen-chars-xx"] {
        let (line, key, _) = invalid(&format!(
            "[interface]\nprivate_key = \"{KEY}\"\nname = \"{name}\"\n"
        ));
        assert_eq!((line, key.as_str()), (3, "interface.name"), "{name}");
    }
}

#[test]
fn key_file_errors_point_at_the_config_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("warren.toml");
    std::fs::write(
        &cfg,
        "[interface]\nmtu = 1400\nprivate_key_file = \"/nonexistent/key\"\n",
    )
    .unwrap();
    let e = Config::load(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("warren.toml:3: key `interface.private_key_file`"),
        "{e}"
    );
    assert!(e.contains("cannot read /nonexistent/key"), "{e}");
    let keyfile = dir.path().join("key");
    std::fs::write(&keyfile, format!("{KEY}\n")).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "[interface]\nprivate_key_file = \"{}\"\n",
            keyfile.display()
        ),
    )
    .unwrap();
    let c = Config::load(&cfg).unwrap();
    assert_eq!(c.private_key().unwrap().public().to_string(), PUB);
}

#[test]
fn portmap_protocols_default_to_all_and_can_be_chosen() {
    use crate::portmap::Protocol;
    let c = parse("[agent]\nportmap = true\n").unwrap();
    let pm = c.agent.portmap_config().unwrap();
    assert_eq!(
        pm.protocols(),
        [Protocol::Pcp, Protocol::NatPmp, Protocol::Upnp]
    );
    let c = parse("[agent]\nportmap_protocols = [\"upnp\", \"natpmp\"]\n").unwrap();
    let pm = c.agent.portmap_config().unwrap();
    assert_eq!(pm.protocols(), [Protocol::NatPmp, Protocol::Upnp]);
    let c = parse("[agent]\nportmap = false\nportmap_protocols = [\"pcp\"]\n").unwrap();
    assert!(c.agent.portmap_config().is_none(), "off wins");
}

#[test]
fn bad_portmap_protocols_are_located() {
    let (line, key, msg) =
        invalid("[agent]\nportmap = true\nportmap_protocols = [\"pcp\", \"igd\"]\n");
    assert_eq!(line, 3, "{key}: {msg}");
    assert!(key.starts_with("agent.portmap_protocols"), "{key}");
    assert!(msg.contains("igd") && msg.contains("upnp"), "{msg}");
    let (line, key, msg) = invalid("[agent]\n\nportmap_protocols = []\n");
    assert_eq!(
        (line, key.as_str()),
        (3, "agent.portmap_protocols"),
        "{msg}"
    );
    let (line, key, msg) = invalid("[agent]\nportmap_protocols = [\"pcp\", \"pcp\"]\n");
    assert_eq!((line, key.as_str()), (2, "agent.portmap_protocols"));
    assert!(msg.contains("twice"), "{msg}");
    let (line, key, _) = invalid("[agent]\nportmap_protocols = \"pcp\"\n");
    assert_eq!((line, key.as_str()), (2, "agent.portmap_protocols"));
}

#[test]
fn relay_transport_and_idle_timeout() {
    use crate::relay_client::RelayTransport;
    let c = parse("[agent]\nportmap = false\n").unwrap();
    assert_eq!(c.agent.relay_transport, RelayTransport::Auto);
    assert_eq!(c.agent.relay_idle_timeout, 60);
    for (text, want) in [
        ("auto", RelayTransport::Auto),
        ("upgrade", RelayTransport::Upgrade),
        ("websocket", RelayTransport::WebSocket),
    ] {
        let c = parse(&format!("[agent]\nrelay_transport = \"{text}\"\n")).unwrap();
        assert_eq!(c.agent.relay_transport, want, "{text}");
    }
    let (line, key, msg) = invalid("[agent]\nportmap = true\nrelay_transport = \"ws\"\n");
    assert_eq!((line, key.as_str()), (3, "agent.relay_transport"), "{msg}");
    assert!(
        msg.contains("websocket"),
        "the message lists the choices: {msg}"
    );
    let (line, key, _) = invalid("[agent]\n\nrelay_idle_timeout = 0\n");
    assert_eq!((line, key.as_str()), (3, "agent.relay_idle_timeout"));
    let (line, key, _) = invalid("[agent]\nrelay_idle_timeout = \"1m\"\n");
    assert_eq!((line, key.as_str()), (2, "agent.relay_idle_timeout"));
    let (line, key, _) = invalid("[agent]\nbusy_poll_us = 2000\n");
    assert_eq!((line, key.as_str()), (2, "agent.busy_poll_us"));
    let (line, key, _) = invalid("[agent]\nportmap = true\nbirthday_ports = 4\n");
    assert_eq!((line, key.as_str()), (3, "agent.birthday_ports"));
    let (line, key, _) = invalid("[agent]\nbirthday_ports = -1\n");
    assert_eq!((line, key.as_str()), (2, "agent.birthday_ports"));
}

#[test]
fn error_message_names_file() {
    let e = parse("[interface]\nmtu = 100\n").unwrap_err().to_string();
    assert!(e.starts_with("warren.toml:2: key `interface.mtu`"), "{e}");
}

#[test]
fn a_filter_file_is_loaded_and_a_bad_one_named_by_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let filter = dir.path().join("filter.json");
    std::fs::write(
        &filter,
        r#"[{"proto": [6], "src": ["100.64.0.1/32"], "dst": [{"net": "100.64.0.2/32", "ports": [22, 22]}]}]"#,
    )
    .unwrap();
    let cfg = dir.path().join("warren.toml");
    let text = format!(
        "[interface]\nprivate_key = \"{KEY}\"\nfilter_file = \"{}\"\n",
        filter.display()
    );
    std::fs::write(&cfg, &text).unwrap();
    let c = Config::load(&cfg).unwrap();
    assert_eq!(c.packet_filter().map(<[_]>::len), Some(1));

    std::fs::write(&filter, "[{\"proto\": [6],\n \"src\": \"nope\"}]").unwrap();
    let e = Config::load(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("warren.toml:3: key `interface.filter_file`") && e.contains("line 2"),
        "{e}"
    );
    std::fs::remove_file(&filter).unwrap();
    let e = Config::load(&cfg).unwrap_err().to_string();
    assert!(e.contains("cannot read"), "{e}");
}
