//! The names a policy uses must exist, and each kind of selector may only
//! appear where Tailscale allows it. A policy that names an unknown user,
//! an undefined group or host, or a tag nobody owns is refused with the
//! entry's place, as Tailscale refuses it: a typo in a name would
//! otherwise silently grant nothing (or, in a `tests` entry, pass).

use super::{Inventory, Policy, PolicyError, PolicyErrorKind as K, Selector, Spanned};

/// Where a selector stands, which decides what it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Src,
    Dst,
    TagOwner,
    Approver,
    TestSrc,
    TestDst,
}

impl Place {
    fn name(self) -> &'static str {
        match self {
            Place::Src => "src",
            Place::Dst => "dst",
            Place::TagOwner => "tagOwners",
            Place::Approver => "autoApprovers",
            Place::TestSrc => "a test's src",
            Place::TestDst => "a test's accept or deny",
        }
    }
}

impl Policy {
    /// Checks every name against the file and the network's users.
    pub fn check(&self, inventory: &Inventory) -> Result<(), PolicyError> {
        for g in &self.groups {
            let entry = format!("groups.\"group:{}\"", g.name);
            for m in &g.members {
                let at = |kind| PolicyError {
                    pos: m.pos,
                    entry: entry.clone(),
                    kind: Box::new(kind),
                };
                if let Some(inner) = m.value.strip_prefix("group:") {
                    return Err(at(K::NestedGroup(inner.to_owned())));
                }
                match Selector::parse(&m.value) {
                    Ok(Selector::User(email)) => self.user(inventory, &email, m.pos, &entry)?,
                    _ => return Err(at(K::NotAUser(m.value.clone()))),
                }
            }
        }
        for t in &self.tag_owners {
            let entry = format!("tagOwners.{:?}", t.tag);
            for o in &t.owners {
                self.selector(inventory, o, Place::TagOwner, &entry)?;
            }
        }
        for r in &self.rules {
            for s in &r.src {
                self.selector(inventory, s, Place::Src, &r.entry)?;
            }
            for d in &r.dst {
                self.selector(inventory, &d.sel, Place::Dst, &r.entry)?;
            }
        }
        for a in &self.auto_approvers.routes {
            for s in &a.approvers {
                self.selector(inventory, s, Place::Approver, "autoApprovers.routes")?;
            }
        }
        for s in &self.auto_approvers.exit_node {
            self.selector(inventory, s, Place::Approver, "autoApprovers.exitNode")?;
        }
        for t in &self.tests {
            self.selector(inventory, &t.src, Place::TestSrc, &t.entry)?;
            for d in t.accept.iter().chain(&t.deny) {
                self.selector(inventory, &d.sel, Place::TestDst, &t.entry)?;
            }
        }
        Ok(())
    }

    fn user(
        &self,
        inventory: &Inventory,
        email: &str,
        pos: super::Pos,
        entry: &str,
    ) -> Result<(), PolicyError> {
        if inventory.user_by_email(email).is_some() {
            return Ok(());
        }
        Err(PolicyError {
            pos,
            entry: entry.to_owned(),
            kind: Box::new(K::UnknownUser(email.to_owned())),
        })
    }

    fn selector(
        &self,
        inventory: &Inventory,
        s: &Spanned<Selector>,
        place: Place,
        entry: &str,
    ) -> Result<(), PolicyError> {
        let at = |kind| PolicyError {
            pos: s.pos,
            entry: entry.to_owned(),
            kind: Box::new(kind),
        };
        let not_here = || {
            at(K::NotHere {
                selector: s.value.to_string(),
                place: place.name(),
            })
        };
        use Place::*;
        let allowed = match (&s.value, place) {
            (Selector::User(_) | Selector::Tag(_), _) => true,
            (Selector::Group(_), TestSrc | TestDst) => false,
            (Selector::Group(_), _) => true,
            (Selector::Host(_) | Selector::Prefix(_), Src | Dst | TestSrc | TestDst) => true,
            (Selector::All, Src | Dst) => true,
            (Selector::Member, Src | Dst | TagOwner | Approver) => true,
            (Selector::Tagged, Src | Dst) => true,
            (Selector::SelfDevices | Selector::Internet, Dst) => true,
            (Selector::DangerAll, Src) => true,
            _ => false,
        };
        if !allowed {
            return Err(not_here());
        }
        match &s.value {
            Selector::User(email) => self.user(inventory, email, s.pos, entry),
            Selector::Group(g) if self.group(g).is_none() => Err(at(K::UnknownGroup(g.clone()))),
            Selector::Tag(t) if self.tag_owner(t).is_none() => Err(at(K::UnknownTag(t.clone()))),
            Selector::Host(h) if self.host(h).is_none() => Err(at(K::UnknownHost(h.clone()))),
            _ => Ok(()),
        }
    }
}
