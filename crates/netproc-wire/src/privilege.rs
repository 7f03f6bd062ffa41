//! The privilege vocabulary. It lives here because it travels in `AuthOk`.

use std::fmt;
use std::str::FromStr;

macro_rules! privileges {
    ($( $(#[$doc:meta])* $variant:ident => $name:literal, )*) => {
        /// A named privilege, as it travels on the wire.
        ///
        /// `AdminPrivileges` and `AllPrivileges` each satisfy every operation;
        /// that rule is applied by `netproc-auth`, not here.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum Privilege {
            $( $(#[$doc])* $variant, )*
        }

        impl Privilege {
            /// Every privilege, in a stable order (its index is its bit in a privilege set).
            pub const ALL: &'static [Privilege] = &[ $( Privilege::$variant, )* ];

            /// The name as it travels on the wire.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( Privilege::$variant => $name, )*
                }
            }
        }

        impl FromStr for Privilege {
            type Err = UnknownPrivilege;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $( $name => Ok(Privilege::$variant), )*
                    other => Err(UnknownPrivilege(other.chars().take(64).collect())),
                }
            }
        }
    };
}

privileges! {
    /// Call functions.
    InvokeFunctions => "invoke_functions",
    /// Define run-time (script) functions.
    DefineFunctions => "define_functions",
    /// Remove run-time functions.
    UndefineFunctions => "undefine_functions",
    /// Define constants.
    DefineConstants => "define_constants",
    /// Remove constants.
    UndefineConstants => "undefine_constants",
    /// Define dependencies (modules importable by scripts).
    DefineDependencies => "define_dependencies",
    /// Remove dependencies.
    UndefineDependencies => "undefine_dependencies",
    /// Administer the server; satisfies every operation.
    AdminPrivileges => "admin_privileges",
    /// Every privilege; satisfies every operation.
    AllPrivileges => "all_privileges",
    /// Receive propagated credentials (netproc's addition to the reference's nine).
    ReceiveCredentials => "receive_credentials",
}

impl Privilege {
    /// This privilege's position in [`Privilege::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Privilege {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A privilege name this version does not know (truncated to 64 characters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown privilege {0:?}")]
pub struct UnknownPrivilege(pub String);

impl serde::Serialize for Privilege {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Privilege {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PrivVisitor;
        impl serde::de::Visitor<'_> for PrivVisitor {
            type Value = Privilege;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a privilege name")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Privilege, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(PrivVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ten_names_round_trip() {
        assert_eq!(Privilege::ALL.len(), 10);
        for (i, p) in Privilege::ALL.iter().enumerate() {
            assert_eq!(p.index(), i);
            assert_eq!(p.as_str().parse::<Privilege>().unwrap(), *p);
        }
    }

    #[test]
    fn unknown_name_is_an_error() {
        assert!("root".parse::<Privilege>().is_err());
    }
}
