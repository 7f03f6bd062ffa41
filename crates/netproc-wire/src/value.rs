//! `Value`: the self-describing value carried by calls, results and errors.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;

use serde::de::{self, DeserializeSeed, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Fails a value decode with `reason`, keeping the reason where the message
/// decoder can find it (postcard drops the text of custom errors).
fn fail<E: de::Error>(reason: &'static str) -> E {
    set_value_error(reason);
    E::custom(reason)
}

/// Default maximum nesting of lists and maps inside one [`Value`].
pub const DEFAULT_MAX_VALUE_DEPTH: u32 = 64;

/// Default maximum number of nodes (every null, number, string, list, map and
/// map entry value counts one) in one decoded [`Value`].
pub const DEFAULT_MAX_VALUE_NODES: u32 = 1 << 20;

/// A self-describing value: what arguments, results, constants and error
/// details are made of.
///
/// Postcard, netproc's encoding, is not self-describing, so `Value` carries
/// its own type tag. Map keys are strings kept in sorted order and unique, so
/// every value has exactly one encoding.
///
/// Convert from and to your own types with [`to_value`](crate::to_value) and
/// [`from_value`](crate::from_value).
///
/// Its `Serialize`/`Deserialize` implementations are the postcard wire form
/// (tagged), not a natural JSON shape. Decoding is bounded: nesting deeper
/// than [`DEFAULT_MAX_VALUE_DEPTH`] or more than [`DEFAULT_MAX_VALUE_NODES`]
/// nodes is refused (see [`Value::decode`] for other limits).
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    /// Nothing.
    #[default]
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed 64-bit integer.
    Int(i64),
    /// A 64-bit float.
    Float(f64),
    /// A UTF-8 string.
    String(String),
    /// Raw bytes. A value decoded from a frame with
    /// [`ClientMessage::decode_shared`](crate::ClientMessage::decode_shared)
    /// (as the server and client do) shares the frame's buffer instead of
    /// copying it: keeping a small slice of a large frame for long keeps the
    /// frame's memory; copy it (`Bytes::copy_from_slice`) to keep it apart.
    Bytes(Bytes),
    /// An ordered list.
    List(Vec<Value>),
    /// A map with string keys, sorted and unique.
    Map(BTreeMap<String, Value>),
}

const TAG_NULL: u32 = 0;
const TAG_BOOL: u32 = 1;
const TAG_INT: u32 = 2;
const TAG_FLOAT: u32 = 3;
const TAG_STRING: u32 = 4;
const TAG_BYTES: u32 = 5;
const TAG_LIST: u32 = 6;
const TAG_MAP: u32 = 7;
pub(crate) const VALUE_ENUM: &str = "Value";
/// A static (not a const): `from_value` recognizes `Value`'s own
/// deserializer by this address.
pub(crate) static VARIANTS: &[&str] = &[
    "Null", "Bool", "Int", "Float", "String", "Bytes", "List", "Map",
];

/// Limits applied while decoding a [`Value`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValueLimits {
    /// Maximum nesting of lists and maps. Default [`DEFAULT_MAX_VALUE_DEPTH`].
    pub max_depth: u32,
    /// Maximum nodes in one value. Default [`DEFAULT_MAX_VALUE_NODES`].
    pub max_nodes: u32,
}

impl Default for ValueLimits {
    fn default() -> Self {
        ValueLimits {
            max_depth: DEFAULT_MAX_VALUE_DEPTH,
            max_nodes: DEFAULT_MAX_VALUE_NODES,
        }
    }
}

/// Why bytes did not decode as a [`Value`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value: {0}")]
pub struct ValueDecodeError(String);

impl Value {
    /// The value's type, for messages: `"null"`, `"bool"`, `"int"`, …
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::String(_) => "string",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Map(_) => "map",
        }
    }

    /// Encodes this value alone (postcard, as inside messages).
    pub fn encode(&self) -> Vec<u8> {
        // Serializing a `Value` into a growable vector cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes one value from `bytes`, which must hold exactly one.
    ///
    /// ```
    /// use netproc_wire::{Value, ValueLimits};
    ///
    /// let v = Value::List(vec![Value::Int(1), Value::String("two".into())]);
    /// let bytes = v.encode();
    /// assert_eq!(Value::decode(&bytes, ValueLimits::default()).unwrap(), v);
    ///
    /// let strict = ValueLimits { max_depth: 0, ..ValueLimits::default() };
    /// assert!(Value::decode(&bytes, strict).is_err());
    /// ```
    pub fn decode(bytes: &[u8], limits: ValueLimits) -> Result<Value, ValueDecodeError> {
        let nodes = Cell::new(limits.max_nodes);
        let mut de = postcard::Deserializer::from_bytes(bytes);
        take_value_error();
        let value = ValueSeed {
            depth_left: limits.max_depth,
            nodes_left: &nodes,
        }
        .deserialize(&mut de)
        .map_err(|e| {
            ValueDecodeError(take_value_error().map_or_else(|| e.to_string(), str::to_owned))
        })?;
        let rest = de.finalize().map_err(|e| ValueDecodeError(e.to_string()))?;
        if !rest.is_empty() {
            return Err(ValueDecodeError(format!("{} trailing bytes", rest.len())));
        }
        Ok(value)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Int(v.into())
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::String(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::String(v)
    }
}
impl From<Vec<Value>> for Value {
    fn from(v: Vec<Value>) -> Self {
        Value::List(v)
    }
}
impl From<BTreeMap<String, Value>> for Value {
    fn from(v: BTreeMap<String, Value>) -> Self {
        Value::Map(v)
    }
}

/// Serializes bytes as postcard bytes (length, then raw bytes).
struct RawBytes<'a>(&'a [u8]);

impl Serialize for RawBytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

struct EntriesRef<'a>(&'a BTreeMap<String, Value>);

impl Serialize for EntriesRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

struct ItemsRef<'a>(&'a [Value]);

impl Serialize for ItemsRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for v in self.0 {
            seq.serialize_element(v)?;
        }
        seq.end()
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit_variant("Value", TAG_NULL, "Null"),
            Value::Bool(b) => s.serialize_newtype_variant("Value", TAG_BOOL, "Bool", b),
            Value::Int(i) => s.serialize_newtype_variant("Value", TAG_INT, "Int", i),
            Value::Float(f) => s.serialize_newtype_variant("Value", TAG_FLOAT, "Float", f),
            Value::String(v) => s.serialize_newtype_variant("Value", TAG_STRING, "String", v),
            Value::Bytes(b) => {
                s.serialize_newtype_variant("Value", TAG_BYTES, "Bytes", &RawBytes(b))
            }
            Value::List(l) => s.serialize_newtype_variant("Value", TAG_LIST, "List", &ItemsRef(l)),
            Value::Map(m) => s.serialize_newtype_variant("Value", TAG_MAP, "Map", &EntriesRef(m)),
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    /// Decodes with the default [`ValueLimits`].
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let limits = ValueLimits::default();
        let nodes = Cell::new(limits.max_nodes);
        ValueSeed {
            depth_left: limits.max_depth,
            nodes_left: &nodes,
        }
        .deserialize(d)
    }
}

/// Decodes one value, charging one node and, for lists and maps, one level.
struct ValueSeed<'a> {
    depth_left: u32,
    nodes_left: &'a Cell<u32>,
}

impl ValueSeed<'_> {
    fn charge_node<E: de::Error>(&self) -> Result<(), E> {
        match self.nodes_left.get().checked_sub(1) {
            Some(n) => {
                self.nodes_left.set(n);
                Ok(())
            }
            None => Err(fail("value has too many nodes")),
        }
    }

    fn nested<E: de::Error>(&self) -> Result<u32, E> {
        self.depth_left
            .checked_sub(1)
            .ok_or_else(|| fail("value nested too deeply"))
    }
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_enum("Value", VARIANTS, self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a netproc value")
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        self.charge_node()?;
        let (tag, variant): (u32, _) = data.variant()?;
        match tag {
            TAG_NULL => variant.unit_variant().map(|()| Value::Null),
            TAG_BOOL => variant.newtype_variant().map(Value::Bool),
            TAG_INT => variant.newtype_variant().map(Value::Int),
            TAG_FLOAT => variant.newtype_variant().map(Value::Float),
            TAG_STRING => variant.newtype_variant().map(Value::String),
            TAG_BYTES => variant
                .newtype_variant_seed(SharedBytesSeed)
                .map(Value::Bytes),
            TAG_HANDOFF => match HANDOFF.take() {
                Some(value) => variant.unit_variant().map(|()| value),
                None => Err(fail("unknown value tag")),
            },
            TAG_LIST => {
                let depth_left = self.nested()?;
                variant
                    .newtype_variant_seed(ListSeed {
                        depth_left,
                        nodes_left: self.nodes_left,
                    })
                    .map(Value::List)
            }
            TAG_MAP => {
                let depth_left = self.nested()?;
                variant
                    .newtype_variant_seed(MapSeed {
                        depth_left,
                        nodes_left: self.nodes_left,
                    })
                    .map(Value::Map)
            }
            _ => Err(fail("unknown value tag")),
        }
    }
}

/// The tag of a value handed over whole by `from_value` (see
/// [`hand_over`]). Never valid on the wire: refused there as unknown.
pub(crate) const TAG_HANDOFF: u32 = u32::MAX;

thread_local! {
    /// A value on its way from `from_value` to `Value`'s own deserializer.
    static HANDOFF: Cell<Option<Value>> = const { Cell::new(None) };
}

/// Runs `f` with `value` ready to be taken whole by the `Value`
/// deserializer that `f` drives (tag [`TAG_HANDOFF`]): converting a
/// `Value` into a `Value` moves it, however deep, instead of rebuilding it.
pub(crate) fn hand_over<T>(value: Value, f: impl FnOnce() -> T) -> T {
    HANDOFF.set(Some(value));
    let out = f();
    // Dropped here if nothing took it (an error before the take).
    drop(HANDOFF.take());
    out
}

thread_local! {
    /// The buffer being decoded, if the decoder was given one: byte values
    /// found inside it are shared, not copied.
    static SOURCE: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Runs `f` with `source` as the buffer byte values may share.
pub(crate) fn with_source<T>(source: &Bytes, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Bytes>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            SOURCE.with(|s| *s.borrow_mut() = previous);
        }
    }
    let previous = SOURCE.with(|s| s.borrow_mut().replace(source.clone()));
    let _restore = Restore(previous);
    f()
}

/// `slice` as `Bytes`: a view of the source buffer when it lies inside it,
/// else a copy.
pub(crate) fn share(slice: &[u8]) -> Bytes {
    SOURCE.with(|s| match s.borrow().as_ref() {
        Some(source) if within(source, slice) => source.slice_ref(slice),
        _ => Bytes::copy_from_slice(slice),
    })
}

fn within(outer: &[u8], inner: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
    !inner.is_empty() && i >= o && i + inner.len() <= o + outer.len()
}

/// Deserializes postcard bytes into `Bytes`, shared with the source buffer
/// when there is one.
struct SharedBytesSeed;

impl<'de> DeserializeSeed<'de> for SharedBytesSeed {
    type Value = Bytes;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Bytes, D::Error> {
        d.deserialize_bytes(self)
    }
}

impl Visitor<'_> for SharedBytesSeed {
    type Value = Bytes;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bytes")
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
        Ok(share(v))
    }
    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
        Ok(Bytes::from(v))
    }
}

/// Deserializes postcard bytes into a `Vec<u8>` (also used by messages).
pub(crate) struct BytesSeed;

impl<'de> DeserializeSeed<'de> for BytesSeed {
    type Value = Vec<u8>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(self)
    }
}

impl Visitor<'_> for BytesSeed {
    type Value = Vec<u8>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bytes")
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }
    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }
}

/// Never pre-allocates more than this many elements from a declared length:
/// the declared length is the peer's claim, the elements are what it sent.
const MAX_PREALLOC: usize = 1024;

struct ListSeed<'a> {
    depth_left: u32,
    nodes_left: &'a Cell<u32>,
}

impl<'de> DeserializeSeed<'de> for ListSeed<'_> {
    type Value = Vec<Value>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<Value>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ListSeed<'_> {
    type Value = Vec<Value>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of values")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Value>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_PREALLOC));
        while let Some(v) = seq.next_element_seed(ValueSeed {
            depth_left: self.depth_left,
            nodes_left: self.nodes_left,
        })? {
            out.push(v);
        }
        Ok(out)
    }
}

struct MapSeed<'a> {
    depth_left: u32,
    nodes_left: &'a Cell<u32>,
}

impl<'de> DeserializeSeed<'de> for MapSeed<'_> {
    type Value = BTreeMap<String, Value>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MapSeed<'_> {
    type Value = BTreeMap<String, Value>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map with sorted, unique string keys")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out: BTreeMap<String, Value> = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            // Keys must arrive strictly increasing: sorted and unique, so a
            // value has one encoding only.
            if let Some((last, _)) = out.last_key_value()
                && key.as_str() <= last.as_str()
            {
                return Err(fail(if key == *last {
                    "duplicate map key"
                } else {
                    "map keys out of order"
                }));
            }
            let v = map.next_value_seed(ValueSeed {
                depth_left: self.depth_left,
                nodes_left: self.nodes_left,
            })?;
            out.insert(key, v);
        }
        Ok(out)
    }
}

thread_local! {
    /// The reason the last `Value` decode on this thread failed. postcard
    /// drops the text of custom serde errors, so `Value`'s decoder leaves it
    /// here for the message decoder to report.
    static VALUE_ERROR: Cell<Option<&'static str>> = const { Cell::new(None) };
}

pub(crate) fn set_value_error(reason: &'static str) {
    VALUE_ERROR.with(|c| c.set(Some(reason)));
}

pub(crate) fn take_value_error() -> Option<&'static str> {
    VALUE_ERROR.with(Cell::take)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested_lists(depth: usize) -> Value {
        let mut v = Value::Null;
        for _ in 0..depth {
            v = Value::List(vec![v]);
        }
        v
    }

    #[test]
    fn encodings_are_the_documented_bytes() {
        assert_eq!(Value::Null.encode(), [0]);
        assert_eq!(Value::Bool(true).encode(), [1, 1]);
        assert_eq!(Value::Int(-1).encode(), [2, 1]);
        assert_eq!(Value::Int(300).encode(), [2, 0xd8, 0x04]);
        assert_eq!(
            Value::Float(1.0).encode(),
            [3, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f]
        );
        assert_eq!(Value::from("hi").encode(), [4, 2, b'h', b'i']);
        assert_eq!(Value::Bytes(vec![9].into()).encode(), [5, 1, 9]);
        assert_eq!(Value::List(vec![Value::Null]).encode(), [6, 1, 0]);
        let map = Value::Map([("a".to_owned(), Value::Null)].into());
        assert_eq!(map.encode(), [7, 1, 1, b'a', 0]);
    }

    #[test]
    fn depth_limit_is_exact() {
        let limits = ValueLimits::default();
        let ok = nested_lists(64);
        assert_eq!(Value::decode(&ok.encode(), limits).unwrap(), ok);
        let err = Value::decode(&nested_lists(65).encode(), limits).unwrap_err();
        assert!(err.to_string().contains("nested too deeply"), "{err}");
    }

    #[test]
    fn depth_bomb_bytes_are_refused_without_recursing() {
        // 100k "list of one" headers: would overflow the stack without a limit.
        let mut bytes = Vec::new();
        for _ in 0..100_000 {
            bytes.extend_from_slice(&[6, 1]);
        }
        bytes.push(0);
        assert!(Value::decode(&bytes, ValueLimits::default()).is_err());
        // And through the serde path used inside messages.
        assert!(postcard::from_bytes::<Value>(&bytes).is_err());
    }

    #[test]
    fn node_limit_is_enforced() {
        let v = Value::List(vec![Value::Null; 10]);
        let limits = ValueLimits {
            max_nodes: 10,
            ..ValueLimits::default()
        };
        assert!(Value::decode(&v.encode(), limits).is_err());
        let limits = ValueLimits {
            max_nodes: 11,
            ..ValueLimits::default()
        };
        assert_eq!(Value::decode(&v.encode(), limits).unwrap(), v);
    }

    #[test]
    fn huge_declared_list_length_does_not_allocate_it() {
        // Declares u32::MAX elements, sends none.
        let bytes = [6, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(Value::decode(&bytes, ValueLimits::default()).is_err());
    }

    #[test]
    fn unsorted_and_duplicate_keys_are_refused() {
        let dup = [7, 2, 1, b'a', 0, 1, b'a', 0];
        let err = Value::decode(&dup, ValueLimits::default()).unwrap_err();
        assert!(err.to_string().contains("duplicate"), "{err}");
        let unsorted = [7, 2, 1, b'b', 0, 1, b'a', 0];
        let err = Value::decode(&unsorted, ValueLimits::default()).unwrap_err();
        assert!(err.to_string().contains("order"), "{err}");
    }

    #[test]
    fn unknown_tag_and_trailing_bytes_are_refused() {
        assert!(Value::decode(&[8], ValueLimits::default()).is_err());
        let err = Value::decode(&[0, 0], ValueLimits::default()).unwrap_err();
        assert!(err.to_string().contains("trailing"), "{err}");
    }

    /// The tag `from_value` uses in memory is just an unknown tag on the
    /// wire (nothing is handed over outside `from_value`'s own call).
    #[test]
    fn the_hand_off_tag_is_refused_on_the_wire() {
        let wire = [0xFF, 0xFF, 0xFF, 0xFF, 0x0F];
        let err = Value::decode(&wire, ValueLimits::default()).unwrap_err();
        assert!(err.to_string().contains("unknown value tag"), "{err}");
    }
}
