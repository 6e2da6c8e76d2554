//! Gateway answers to NAT-PMP and PCP, as warren asks them: arbitrary bytes
//! come back from a fake gateway on loopback, and nothing may panic or hang.
//!
//! warren does not decode these protocols itself: `src/portmap` calls
//! crab_nat (see its module doc). So this target drives the calls warren
//! makes — `warren::portmap::probe` (netcheck's presence check, whose
//! classification of failures is ours) and the two mapping requests of the
//! port mapper with the options it uses — over a real socket, because
//! crab_nat exposes no decoder apart from its IO. Every call returns on the
//! first datagram, so an iteration costs a few loopback round trips.
//!
//! Input: byte 0 picks the calls and whether to copy the request's nonce
//! (PCP) or internal port (NAT-PMP) into the answer, so that the fuzzer
//! gets past those checks to the fields behind them; byte 1 splits the
//! rest into the NAT-PMP answer and the PCP answer.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU16;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crab_nat::{natpmp, pcp, InternetProtocol, PortMappingOptions, TimeoutConfig};
use libfuzzer_sys::fuzz_target;
use tokio::net::UdpSocket;
use tokio::runtime::Runtime;
use warren::portmap;

/// Any 127/8 address is loopback on Linux; an unusual one keeps clear of
/// a real NAT-PMP daemon on 127.0.0.1.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(127, 53, 51, 1);
/// Where crab_nat sends both protocols (RFC 6886, RFC 6887).
const PORT: u16 = 5351;
/// Only reached if an answer is lost: the fake gateway always answers.
const TIMEOUT: Duration = Duration::from_millis(500);

struct Fixture {
    rt: Runtime,
    gateway: Arc<UdpSocket>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let gateway = rt.block_on(async {
            UdpSocket::bind((GATEWAY, PORT))
                .await
                .expect("bind the fake gateway on 127.53.51.1:5351")
        });
        Fixture {
            rt,
            gateway: Arc::new(gateway),
        }
    })
}

/// Answers every request with `natpmp_answer` or `pcp_answer` (by the
/// request's version byte), patched with the request's identifying fields
/// when `patch`.
async fn serve(gateway: Arc<UdpSocket>, natpmp_answer: Vec<u8>, pcp_answer: Vec<u8>, patch: bool) {
    let mut buf = [0u8; 1100];
    loop {
        let Ok((n, from)) = gateway.recv_from(&mut buf).await else {
            return;
        };
        let req = &buf[..n];
        let mut answer = if req.first() == Some(&2) {
            pcp_answer.clone()
        } else {
            natpmp_answer.clone()
        };
        if patch {
            // PCP: the MAP nonce sits at 24..36 in request and answer.
            // NAT-PMP: the mapping request's internal port is at 4..6, the
            // answer's at 8..10.
            if req.first() == Some(&2) && n >= 36 && answer.len() >= 36 {
                answer[24..36].copy_from_slice(&req[24..36]);
            } else if n >= 6 && answer.len() >= 10 {
                answer[8..10].copy_from_slice(&req[4..6]);
            }
        }
        let _ = gateway.send_to(&answer, from).await;
    }
}

fn timeouts() -> TimeoutConfig {
    TimeoutConfig {
        initial_timeout: TIMEOUT,
        max_retries: 0,
        max_retry_timeout: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let [flags, split, rest @ ..] = data else {
        return;
    };
    let split = usize::from(*split).min(rest.len());
    let (natpmp_answer, pcp_answer) = rest.split_at(split);
    let f = fixture();
    let gw = IpAddr::V4(GATEWAY);
    let port = NonZeroU16::new(51820).expect("non-zero");
    let options = || PortMappingOptions {
        external_port: Some(port),
        lifetime_seconds: Some(7200),
        timeout_config: Some(timeouts()),
    };
    f.rt.block_on(async {
        let server = tokio::spawn(serve(
            f.gateway.clone(),
            natpmp_answer.to_vec(),
            pcp_answer.to_vec(),
            flags & 1 == 1,
        ));
        match (flags >> 1) % 3 {
            0 => {
                let config = portmap::Config {
                    upnp: false,
                    gateway: Some(gw),
                    request_timeout: TIMEOUT,
                    ..portmap::Config::default()
                };
                let _ = portmap::probe(&config).await;
            }
            1 => {
                let _ = natpmp::external_address(gw.into(), Some(timeouts())).await;
                if let Ok(m) =
                    natpmp::port_mapping(gw.into(), InternetProtocol::Udp, port, options()).await
                {
                    // What the mapper reads from a granted mapping.
                    let _ = (m.external_port(), m.lifetime());
                }
            }
            _ => {
                let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
                let base = pcp::BaseMapRequest::new(gw.into(), client, InternetProtocol::Udp, port);
                if let Ok(m) = pcp::port_mapping(base, None, None, options()).await {
                    // What the mapper reads from a granted mapping.
                    let _ = (m.mapping_type(), m.external_port(), m.lifetime());
                }
            }
        }
        server.abort();
    });
});
