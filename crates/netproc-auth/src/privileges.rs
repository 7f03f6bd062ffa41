//! Sets of privileges.

use std::fmt;
use std::str::FromStr;

use netproc_wire::{Privilege, UnknownPrivilege};

/// A set of [`Privilege`]s, as a bitset.
///
/// `admin_privileges` and `all_privileges` each satisfy every requirement
/// (see [`PrivilegeSet::satisfies`]). Parses from and displays as
/// comma-separated names; serializes as a list of names.
///
/// ```
/// use netproc_auth::PrivilegeSet;
/// use netproc_wire::Privilege;
///
/// let set: PrivilegeSet = "invoke_functions, define_constants".parse().unwrap();
/// assert!(set.satisfies(Privilege::InvokeFunctions));
/// assert!(!set.satisfies(Privilege::DefineFunctions));
/// assert!(PrivilegeSet::from([Privilege::AdminPrivileges]).satisfies(Privilege::DefineFunctions));
/// assert_eq!(set.to_string(), "invoke_functions,define_constants");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PrivilegeSet(u32);

impl PrivilegeSet {
    /// No privileges: the session authenticates, and may ping and list.
    pub const fn empty() -> PrivilegeSet {
        PrivilegeSet(0)
    }

    /// Every privilege.
    pub fn all() -> PrivilegeSet {
        Privilege::ALL.iter().copied().collect()
    }

    /// Whether `privilege` is in the set (literally; see [`satisfies`](Self::satisfies)).
    pub fn contains(self, privilege: Privilege) -> bool {
        self.0 & bit(privilege) != 0
    }

    /// Adds a privilege.
    pub fn insert(&mut self, privilege: Privilege) {
        self.0 |= bit(privilege);
    }

    /// Removes a privilege.
    pub fn remove(&mut self, privilege: Privilege) {
        self.0 &= !bit(privilege);
    }

    /// Whether an operation needing `required` is allowed: the set holds it,
    /// or `admin_privileges`, or `all_privileges`.
    pub fn satisfies(self, required: Privilege) -> bool {
        self.contains(required)
            || self.contains(Privilege::AdminPrivileges)
            || self.contains(Privilege::AllPrivileges)
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The privileges in the set, in [`Privilege::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Privilege> {
        Privilege::ALL
            .iter()
            .copied()
            .filter(move |p| self.contains(*p))
    }

    /// The names, for `AuthOk`.
    pub fn names(self) -> Vec<String> {
        self.iter().map(|p| p.as_str().to_owned()).collect()
    }
}

fn bit(p: Privilege) -> u32 {
    1 << p.index()
}

impl FromIterator<Privilege> for PrivilegeSet {
    fn from_iter<I: IntoIterator<Item = Privilege>>(iter: I) -> Self {
        let mut set = PrivilegeSet::empty();
        for p in iter {
            set.insert(p);
        }
        set
    }
}

impl<const N: usize> From<[Privilege; N]> for PrivilegeSet {
    fn from(privileges: [Privilege; N]) -> Self {
        privileges.into_iter().collect()
    }
}

impl fmt::Display for PrivilegeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(p.as_str())?;
        }
        Ok(())
    }
}

impl fmt::Debug for PrivilegeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl FromStr for PrivilegeSet {
    type Err = UnknownPrivilege;

    /// Names separated by commas and/or whitespace; empty means no privileges.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(|c: char| c == ',' || c.is_whitespace())
            .filter(|n| !n.is_empty())
            .map(Privilege::from_str)
            .collect()
    }
}

impl serde::Serialize for PrivilegeSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> serde::Deserialize<'de> for PrivilegeSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Vec::<Privilege>::deserialize(d)?.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn admin_and_all_satisfy_everything_else_only_itself() {
        for p in Privilege::ALL {
            assert!(PrivilegeSet::from([Privilege::AdminPrivileges]).satisfies(*p));
            assert!(PrivilegeSet::from([Privilege::AllPrivileges]).satisfies(*p));
            assert!(!PrivilegeSet::empty().satisfies(*p));
            for q in Privilege::ALL {
                let one = PrivilegeSet::from([*q]);
                let expected =
                    p == q || matches!(q, Privilege::AdminPrivileges | Privilege::AllPrivileges);
                assert_eq!(one.satisfies(*p), expected, "{q} satisfies {p}");
            }
        }
    }

    #[test]
    fn unknown_names_are_refused() {
        assert!("invoke_functions,root".parse::<PrivilegeSet>().is_err());
        assert_eq!("".parse::<PrivilegeSet>().unwrap(), PrivilegeSet::empty());
    }

    proptest! {
        #[test]
        fn display_parse_and_serde_round_trip(bits in 0u32..(1 << 10)) {
            let set: PrivilegeSet = Privilege::ALL.iter().copied().filter(|p| bits & (1 << p.index()) != 0).collect();
            prop_assert_eq!(set.to_string().parse::<PrivilegeSet>().unwrap(), set);
            let json = serde_json::to_string(&set).unwrap();
            prop_assert_eq!(serde_json::from_str::<PrivilegeSet>(&json).unwrap(), set);
        }
    }
}
