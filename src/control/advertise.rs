//! What a node may advertise as routes it serves (`warren up
//! --advertise-routes`, `--advertise-exit-node`), checked the same way by
//! the CLI, the daemon and the coordinator (README, "Subnet routers and
//! exit nodes").
//!
//! A route must be written in canonical form (no host bits: `10.0.0.0/24`,
//! not `10.0.0.1/24`, as Tailscale insists too, so that what an admin
//! approves is exactly what is routed), must not overlap the overlay itself
//! (`100.64.0.0/10`, or the network's IPv6 /48 where that is known), and a
//! default route is only advertised as an exit node, which means both
//! families. A list is returned sorted without duplicates, so that two
//! spellings of the same set compare equal (`up` compares settings).

use ipnet::{IpNet, Ipv6Net};

use super::bounds::OVERLAY_V4;

/// The most routes one node may advertise.
pub const MAX_ROUTES: usize = 64;

/// Why a route list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    #[error("{0:?} is not a route (write a prefix such as 10.0.0.0/24)")]
    Syntax(String),
    #[error("{given} has host bits set: write {canonical}")]
    NotCanonical { given: IpNet, canonical: IpNet },
    #[error("{0} overlaps the overlay's own addresses")]
    Overlay(IpNet),
    #[error("{0} is a default route: use --advertise-exit-node")]
    Default(IpNet),
    #[error("{0} routes given; at most {MAX_ROUTES} are allowed")]
    TooMany(usize),
    #[error("{0} is {1}: no router can serve it")]
    Special(IpNet, &'static str),
}

/// Ranges that never lie behind a router: a route inside one is a mistake.
fn special(r: &IpNet) -> Option<&'static str> {
    let inside = |net: &str| net.parse::<IpNet>().is_ok_and(|n| n.contains(r));
    [
        ("127.0.0.0/8", "loopback"),
        ("::1/128", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("fe80::/10", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("ff00::/8", "multicast"),
        ("240.0.0.0/4", "reserved"),
    ]
    .iter()
    .find(|(net, _)| inside(net))
    .map(|(_, what)| *what)
}

/// The two default routes an exit node serves.
pub fn exit_routes() -> [IpNet; 2] {
    [
        IpNet::V4(ipnet::Ipv4Net::default()),
        IpNet::V6(Ipv6Net::default()),
    ]
}

/// Whether `routes` make the node an exit node (both default routes).
pub fn is_exit(routes: &[IpNet]) -> bool {
    exit_routes().iter().all(|r| routes.contains(r))
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Checks subnet routes (no default routes) and returns them sorted, once
/// each. `ula`: the network's IPv6 /48, when known.
pub fn normalize_routes(routes: &[IpNet], ula: Option<Ipv6Net>) -> Result<Vec<IpNet>, RouteError> {
    for r in routes {
        if r.prefix_len() == 0 {
            return Err(RouteError::Default(*r));
        }
        if r.trunc() != *r {
            return Err(RouteError::NotCanonical {
                given: *r,
                canonical: r.trunc(),
            });
        }
        if let Some(what) = special(r) {
            return Err(RouteError::Special(*r, what));
        }
        let overlay = [Some(IpNet::V4(OVERLAY_V4)), ula.map(IpNet::V6)];
        if overlay.iter().flatten().any(|o| overlaps(o, r)) {
            return Err(RouteError::Overlay(*r));
        }
    }
    let mut out = routes.to_vec();
    out.sort();
    out.dedup();
    if out.len() > MAX_ROUTES {
        return Err(RouteError::TooMany(out.len()));
    }
    Ok(out)
}

/// What a node advertises: its subnet routes, and both default routes when
/// it offers itself as an exit node. Checked as [`normalize_routes`], but
/// for the default routes, which only come in as a pair.
pub fn advertised(
    subnets: &[IpNet],
    exit: bool,
    ula: Option<Ipv6Net>,
) -> Result<Vec<IpNet>, RouteError> {
    let mut out = normalize_routes(subnets, ula)?;
    if exit {
        out.extend(exit_routes());
        out.sort();
    }
    Ok(out)
}

/// Checks what a registration carries: subnet routes as
/// [`normalize_routes`], and default routes only as the exit pair.
pub fn check_advertised(routes: &[IpNet], ula: Option<Ipv6Net>) -> Result<Vec<IpNet>, RouteError> {
    let (defaults, subnets): (Vec<IpNet>, Vec<IpNet>) =
        routes.iter().partition(|r| r.prefix_len() == 0);
    let exit = is_exit(&defaults);
    if let Some(lone) = defaults.iter().find(|_| !exit) {
        return Err(RouteError::Default(*lone));
    }
    advertised(&subnets, exit, ula)
}

/// Parses the CLI's comma-separated form; an empty string means "no
/// routes" (so `--advertise-routes ''` withdraws them).
pub fn parse_route_list(s: &str) -> Result<Vec<IpNet>, RouteError> {
    let routes = s
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| {
            r.parse::<IpNet>()
                .map_err(|_| RouteError::Syntax(r.to_owned()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    normalize_routes(&routes, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn a_list_is_canonical_sorted_and_once_each() {
        let got = parse_route_list(" 192.168.50.0/24,10.0.0.0/8 ,fd00:1::/64,10.0.0.0/8").unwrap();
        assert_eq!(got, nets(&["10.0.0.0/8", "192.168.50.0/24", "fd00:1::/64"]));
        assert_eq!(parse_route_list("").unwrap(), vec![]);
    }

    #[test]
    fn bad_routes_are_refused_with_what_to_write() {
        assert_eq!(
            parse_route_list("10.0.0.1/24"),
            Err(RouteError::NotCanonical {
                given: "10.0.0.1/24".parse().unwrap(),
                canonical: "10.0.0.0/24".parse().unwrap()
            })
        );
        let e = parse_route_list("10.0.0.1/24").unwrap_err().to_string();
        assert!(e.contains("write 10.0.0.0/24"), "{e}");
        assert!(matches!(
            parse_route_list("lan"),
            Err(RouteError::Syntax(_))
        ));
        assert!(matches!(
            parse_route_list("100.100.0.0/16"),
            Err(RouteError::Overlay(_))
        ));
        assert!(matches!(
            parse_route_list("100.0.0.0/8"),
            Err(RouteError::Overlay(_))
        ));
        assert!(matches!(
            parse_route_list("0.0.0.0/0"),
            Err(RouteError::Default(_))
        ));
        let ula: Ipv6Net = "fd7a:115c:a1e0::/48".parse().unwrap();
        assert!(matches!(
            normalize_routes(&nets(&["fd7a:115c:a1e0:5::/64"]), Some(ula)),
            Err(RouteError::Overlay(_))
        ));
        for (route, what) in [
            ("127.0.0.0/8", "loopback"),
            ("169.254.1.0/24", "link-local"),
            ("fe80::/64", "link-local"),
            ("239.1.0.0/16", "multicast"),
        ] {
            let e = parse_route_list(route).unwrap_err();
            assert!(
                matches!(e, RouteError::Special(_, w) if w == what),
                "{route}: {e}"
            );
        }
        // A broad route that merely covers the overlay is refused as such.
        assert!(matches!(
            parse_route_list("64.0.0.0/2"),
            Err(RouteError::Overlay(_))
        ));
        let many: Vec<IpNet> = (0..65u8)
            .map(|i| format!("10.{i}.0.0/16").parse().unwrap())
            .collect();
        assert_eq!(normalize_routes(&many, None), Err(RouteError::TooMany(65)));
    }

    #[test]
    fn an_exit_node_advertises_both_default_routes_and_only_both() {
        let got = advertised(&nets(&["10.0.0.0/24"]), true, None).unwrap();
        assert_eq!(got, nets(&["0.0.0.0/0", "10.0.0.0/24", "::/0"]));
        assert!(is_exit(&got));
        assert_eq!(check_advertised(&got, None).unwrap(), got);
        assert!(matches!(
            check_advertised(&nets(&["0.0.0.0/0"]), None),
            Err(RouteError::Default(_))
        ));
        assert!(!is_exit(&nets(&["10.0.0.0/24"])));
    }
}
