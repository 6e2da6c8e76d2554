//! The host's DNS through systemd-resolved (README, "Names and DNS"):
//! the TUN link gets the resolver as its DNS server, the network's domain
//! as a search domain (so short names work) and the split domains as
//! routing-only domains (`~DOMAIN`), so resolved sends those names to
//! warren and everything else where it did before; `~.` and default-route only when the network overrides local
//! DNS. `/etc/resolv.conf` is never written: resolved owns it.
//!
//! Spoken over D-Bus (`zbus`), `org.freedesktop.resolve1.Manager` on the
//! system bus: `SetLinkDNS`, `SetLinkDomains`, `SetLinkDefaultRoute`,
//! `SetLinkLLMNR`/`SetLinkMulticastDNS` off (the overlay has no multicast),
//! and `RevertLink` to give it all back. One task applies the wanted state
//! (a `watch` channel from `DnsHandle`) and looks every few seconds at who
//! owns resolved's bus name: a restarted resolved has a new owner and has
//! forgotten the link, so the settings go again.

use std::time::Duration;

use tokio::sync::watch;

const RESOLVE1: &str = "org.freedesktop.resolve1";
const PATH: &str = "/org/freedesktop/resolve1";
const MANAGER: &str = "org.freedesktop.resolve1.Manager";
/// How often the task checks that resolved still runs as it was.
const RECHECK: Duration = Duration::from_secs(2);
/// Longest wait for one D-Bus call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// `AF_INET` and `AF_INET6`, as resolved's `(iay)` pairs spell families.
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;

/// What the link should say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub wanted: bool,
    /// The resolver's addresses.
    pub servers: Vec<std::net::IpAddr>,
    pub domains: Vec<String>,
    pub override_local: bool,
}

/// The settings resolved gets for `desired`: the routing-only domains and
/// whether the link is a default route.
pub fn link_domains(desired: &Desired) -> (Vec<(String, bool)>, bool) {
    // The network's domain (the first) is a search domain too, so short
    // names work; split domains only route.
    let mut domains: Vec<(String, bool)> = desired
        .domains
        .iter()
        .enumerate()
        .map(|(i, d)| (d.clone(), i > 0))
        .collect();
    if desired.override_local {
        domains.push((".".into(), true));
    }
    (domains, desired.override_local)
}

async fn call<B>(conn: &zbus::Connection, method: &str, body: &B) -> zbus::Result<zbus::Message>
where
    B: serde::Serialize + zbus::zvariant::DynamicType,
{
    let fut = conn.call_method(Some(RESOLVE1), PATH, Some(MANAGER), method, body);
    tokio::time::timeout(CALL_TIMEOUT, fut)
        .await
        .map_err(|_| zbus::Error::Failure(format!("{method}: no answer from systemd-resolved")))?
}

/// The unique bus name owning resolved's name (`None`: not running).
pub async fn owner(conn: &zbus::Connection) -> Option<String> {
    let fut = conn.call_method(
        Some("org.freedesktop.DBus"),
        "/org/freedesktop/DBus",
        Some("org.freedesktop.DBus"),
        "GetNameOwner",
        &(RESOLVE1,),
    );
    let reply = tokio::time::timeout(CALL_TIMEOUT, fut).await.ok()?.ok()?;
    reply.body().deserialize::<String>().ok()
}

/// Sets link `ifindex`'s DNS to `desired`'s servers and domains.
pub async fn apply(conn: &zbus::Connection, ifindex: i32, desired: &Desired) -> zbus::Result<()> {
    let servers: Vec<(i32, Vec<u8>)> = desired
        .servers
        .iter()
        .map(|ip| match ip {
            std::net::IpAddr::V4(a) => (AF_INET, a.octets().to_vec()),
            std::net::IpAddr::V6(a) => (AF_INET6, a.octets().to_vec()),
        })
        .collect();
    call(conn, "SetLinkDNS", &(ifindex, servers)).await?;
    let (domains, default_route) = link_domains(desired);
    call(conn, "SetLinkDomains", &(ifindex, domains)).await?;
    call(conn, "SetLinkDefaultRoute", &(ifindex, default_route)).await?;
    // Neither makes sense on a point-to-point tunnel; a failure is not one.
    let _ = call(conn, "SetLinkLLMNR", &(ifindex, "no")).await;
    let _ = call(conn, "SetLinkMulticastDNS", &(ifindex, "no")).await;
    Ok(())
}

/// Gives link `ifindex` back to resolved's defaults.
pub async fn revert(conn: &zbus::Connection, ifindex: i32) -> zbus::Result<()> {
    call(conn, "RevertLink", &(ifindex,)).await.map(|_| ())
}

/// Applies what `rx` wants until the sender goes; `report` hears of each
/// problem (or `None` once it is gone).
pub async fn run(
    ifindex: i32,
    mut rx: watch::Receiver<Desired>,
    report: impl Fn(Option<String>) + Send + 'static,
) {
    let mut conn: Option<zbus::Connection> = None;
    // The owner the link was set under, and what was set.
    let mut applied: Option<(String, Desired)> = None;
    loop {
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(RECHECK) => {}
        }
        let want = rx.borrow_and_update().clone();
        if !want.wanted && applied.is_none() {
            continue;
        }
        if conn.is_none() {
            match zbus::Connection::system().await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    report(Some(format!(
                        "no D-Bus system bus to reach systemd-resolved: {e}"
                    )));
                    continue;
                }
            }
        }
        let Some(c) = conn.as_ref() else { continue };
        let Some(now_owner) = owner(c).await else {
            if want.wanted {
                report(Some("systemd-resolved is not running; warren's names do not resolve through it until it does".into()));
            }
            applied = None;
            continue;
        };
        if !want.wanted {
            match revert(c, ifindex).await {
                Ok(()) => tracing::info!("DNS: systemd-resolved's link settings reverted"),
                Err(e) => tracing::warn!(error = %e, "DNS: reverting systemd-resolved's link"),
            }
            applied = None;
            report(None);
            continue;
        }
        if applied.as_ref() == Some(&(now_owner.clone(), want.clone())) {
            continue;
        }
        match apply(c, ifindex, &want).await {
            Ok(()) => {
                tracing::info!(domains = ?want.domains, owner = %now_owner, "DNS: systemd-resolved sends the network's names to warren");
                applied = Some((now_owner, want));
                report(None);
            }
            Err(e) => {
                tracing::warn!(error = %e, "DNS: configuring systemd-resolved");
                report(Some(format!(
                    "systemd-resolved refused the link settings: {e}"
                )));
                // A new connection next time: this one may be the problem.
                conn = None;
            }
        }
    }
}

/// Reverts at once (the agent stops), within a few seconds at most.
pub async fn revert_now(ifindex: i32) {
    let run = async {
        let conn = zbus::Connection::system().await.ok()?;
        revert(&conn, ifindex).await.ok()
    };
    if tokio::time::timeout(CALL_TIMEOUT, run)
        .await
        .ok()
        .flatten()
        .is_some()
    {
        tracing::info!("DNS: systemd-resolved's link settings reverted");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_routing_only_and_the_default_route_only_with_override() {
        let d = Desired {
            wanted: true,
            servers: vec!["100.100.100.100".parse().unwrap()],
            domains: vec!["warren.internal".into(), "corp.example".into()],
            override_local: false,
        };
        let (domains, default_route) = link_domains(&d);
        assert_eq!(
            domains,
            vec![
                ("warren.internal".to_string(), false),
                ("corp.example".to_string(), true)
            ]
        );
        assert!(!default_route);
        let (domains, default_route) = link_domains(&Desired {
            override_local: true,
            ..d
        });
        assert!(domains.contains(&(".".to_string(), true)) && default_route);
    }
}
