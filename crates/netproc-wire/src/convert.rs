//! Conversions between [`Value`] and any serde type.
//!
//! Over 600 lines with its tests: a serde `Serializer` and `Deserializer`
//! that mirror each other case by case (every serde data model type, enums
//! as single-entry maps); they are reviewed together, the unit tests here
//! take each case both ways, and `tests/it/props.rs` round-trips them.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::value::{MapDeserializer, SeqDeserializer};
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde::ser::{self, Serialize};

use crate::Value;
use crate::value::{VALUE_ENUM, VARIANTS};

/// Whether serde is (de)serializing netproc's own `Value` enum, which passes
/// through conversions unchanged.
fn is_value_enum(name: &str) -> bool {
    name == VALUE_ENUM
}

/// A conversion between [`Value`] and a Rust type failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(String);

impl ValueError {
    fn new(msg: impl fmt::Display) -> Self {
        ValueError(msg.to_string())
    }
}

impl ser::Error for ValueError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ValueError::new(msg)
    }
}

impl de::Error for ValueError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ValueError::new(msg)
    }
}

/// Converts any serializable value into a [`Value`].
///
/// Structs and maps become maps (keys must be strings; duplicates are an
/// error), sequences and tuples become lists, `Option::None` and `()` become
/// null, enums use the external tagging of serde (`"Unit"` or
/// `{"Variant": …}`). Integers must fit an `i64`: a `u64` above `i64::MAX` is
/// an error, never a wrap.
///
/// ```
/// use netproc_wire::{to_value, from_value, Value};
///
/// let v = to_value(&(2, "three")).unwrap();
/// assert_eq!(v, Value::List(vec![Value::Int(2), Value::from("three")]));
/// let back: (i64, String) = from_value(v).unwrap();
/// assert_eq!(back, (2, "three".to_owned()));
///
/// assert!(to_value(&u64::MAX).is_err());
/// ```
pub fn to_value<T: Serialize + ?Sized>(value: &T) -> Result<Value, ValueError> {
    value.serialize(ValueSerializer)
}

/// Converts a [`Value`] into any deserializable type.
///
/// The error names what was expected and what was found, which servers pass
/// on as `invalid_argument`.
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, ValueError> {
    T::deserialize(value)
}

struct ValueSerializer;

fn int<T: TryInto<i64> + fmt::Display + Copy>(v: T) -> Result<Value, ValueError> {
    v.try_into()
        .map(Value::Int)
        .map_err(|_| ValueError::new(format_args!("integer {v} does not fit in an i64")))
}

fn variant_map(variant: &str, value: Value) -> Value {
    Value::Map(BTreeMap::from([(variant.to_owned(), value)]))
}

impl ser::Serializer for ValueSerializer {
    type Ok = Value;
    type Error = ValueError;
    type SerializeSeq = SerializeList;
    type SerializeTuple = SerializeList;
    type SerializeTupleStruct = SerializeList;
    type SerializeTupleVariant = SerializeList;
    type SerializeMap = SerializeEntries;
    type SerializeStruct = SerializeEntries;
    type SerializeStructVariant = SerializeEntries;

    fn serialize_bool(self, v: bool) -> Result<Value, ValueError> {
        Ok(Value::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Result<Value, ValueError> {
        int(v)
    }
    fn serialize_i16(self, v: i16) -> Result<Value, ValueError> {
        int(v)
    }
    fn serialize_i32(self, v: i32) -> Result<Value, ValueError> {
        int(v)
    }
    fn serialize_i64(self, v: i64) -> Result<Value, ValueError> {
        int(v)
    }
    fn serialize_i128(self, v: i128) -> Result<Value, ValueError> {
        int(v)
    }
    fn serialize_u8(self, v: u8) -> Result<Value, ValueError> {
        int(v)
    }
    fn serialize_u16(self, v: u16) -> Result<Value, ValueError> {
        int(v)
    }
    fn serialize_u32(self, v: u32) -> Result<Value, ValueError> {
        int(v)
    }
    fn serialize_u64(self, v: u64) -> Result<Value, ValueError> {
        int(v)
    }
    fn serialize_u128(self, v: u128) -> Result<Value, ValueError> {
        int(v)
    }
    fn serialize_f32(self, v: f32) -> Result<Value, ValueError> {
        Ok(Value::Float(v.into()))
    }
    fn serialize_f64(self, v: f64) -> Result<Value, ValueError> {
        Ok(Value::Float(v))
    }
    fn serialize_char(self, v: char) -> Result<Value, ValueError> {
        Ok(Value::String(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> Result<Value, ValueError> {
        Ok(Value::String(v.to_owned()))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Value, ValueError> {
        Ok(Value::Bytes(bytes::Bytes::copy_from_slice(v)))
    }
    fn serialize_none(self) -> Result<Value, ValueError> {
        Ok(Value::Null)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Value, ValueError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Value, ValueError> {
        Ok(Value::Null)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<Value, ValueError> {
        Ok(Value::Null)
    }
    fn serialize_unit_variant(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Value, ValueError> {
        if is_value_enum(name) {
            return Ok(Value::Null);
        }
        Ok(Value::String(variant.to_owned()))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<Value, ValueError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Value, ValueError> {
        let inner = value.serialize(self)?;
        if is_value_enum(name) {
            return Ok(inner);
        }
        Ok(variant_map(variant, inner))
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<SerializeList, ValueError> {
        Ok(SerializeList {
            items: Vec::with_capacity(len.unwrap_or(0).min(1024)),
            variant: None,
        })
    }
    fn serialize_tuple(self, len: usize) -> Result<SerializeList, ValueError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<SerializeList, ValueError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<SerializeList, ValueError> {
        Ok(SerializeList {
            items: Vec::with_capacity(len.min(1024)),
            variant: Some(variant),
        })
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<SerializeEntries, ValueError> {
        Ok(SerializeEntries::default())
    }
    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<SerializeEntries, ValueError> {
        Ok(SerializeEntries::default())
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<SerializeEntries, ValueError> {
        Ok(SerializeEntries {
            variant: Some(variant),
            ..SerializeEntries::default()
        })
    }
}

struct SerializeList {
    items: Vec<Value>,
    variant: Option<&'static str>,
}

impl SerializeList {
    fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.items.push(value.serialize(ValueSerializer)?);
        Ok(())
    }
    fn finish(self) -> Value {
        let list = Value::List(self.items);
        match self.variant {
            Some(variant) => variant_map(variant, list),
            None => list,
        }
    }
}

impl ser::SerializeSeq for SerializeList {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.push(value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(self.finish())
    }
}

impl ser::SerializeTuple for SerializeList {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.push(value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(self.finish())
    }
}

impl ser::SerializeTupleStruct for SerializeList {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.push(value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(self.finish())
    }
}

impl ser::SerializeTupleVariant for SerializeList {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.push(value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(self.finish())
    }
}

#[derive(Default)]
struct SerializeEntries {
    entries: BTreeMap<String, Value>,
    next_key: Option<String>,
    variant: Option<&'static str>,
}

impl SerializeEntries {
    fn insert(&mut self, key: String, value: Value) -> Result<(), ValueError> {
        if self.entries.contains_key(&key) {
            return Err(ValueError::new(format_args!("duplicate map key {key:?}")));
        }
        self.entries.insert(key, value);
        Ok(())
    }
    fn finish(self) -> Value {
        let map = Value::Map(self.entries);
        match self.variant {
            Some(variant) => variant_map(variant, map),
            None => map,
        }
    }
}

impl ser::SerializeMap for SerializeEntries {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), ValueError> {
        match key.serialize(ValueSerializer)? {
            Value::String(k) => {
                self.next_key = Some(k);
                Ok(())
            }
            other => Err(ValueError::new(format_args!(
                "map keys must be strings, found {}",
                other.type_name()
            ))),
        }
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        let key = self
            .next_key
            .take()
            .ok_or_else(|| ValueError::new("map value without a key"))?;
        let value = value.serialize(ValueSerializer)?;
        self.insert(key, value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(self.finish())
    }
}

impl ser::SerializeStruct for SerializeEntries {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), ValueError> {
        let value = value.serialize(ValueSerializer)?;
        self.insert(key.to_owned(), value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(self.finish())
    }
}

impl ser::SerializeStructVariant for SerializeEntries {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), ValueError> {
        let value = value.serialize(ValueSerializer)?;
        self.insert(key.to_owned(), value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(self.finish())
    }
}

impl<'de> IntoDeserializer<'de, ValueError> for Value {
    type Deserializer = Value;
    fn into_deserializer(self) -> Value {
        self
    }
}

impl Value {
    fn unexpected(&self) -> de::Unexpected<'_> {
        match self {
            Value::Null => de::Unexpected::Unit,
            Value::Bool(b) => de::Unexpected::Bool(*b),
            Value::Int(i) => de::Unexpected::Signed(*i),
            Value::Float(f) => de::Unexpected::Float(*f),
            Value::String(s) => de::Unexpected::Str(s),
            Value::Bytes(b) => de::Unexpected::Bytes(b),
            Value::List(_) => de::Unexpected::Seq,
            Value::Map(_) => de::Unexpected::Map,
        }
    }
}

impl<'de> de::Deserializer<'de> for Value {
    type Error = ValueError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Int(i) => visitor.visit_i64(i),
            Value::Float(f) => visitor.visit_f64(f),
            Value::String(s) => visitor.visit_string(s),
            // A `Value` target takes the whole value (`hand_over`); others copy.
            Value::Bytes(b) => visitor.visit_bytes(&b),
            Value::List(items) => {
                let mut seq = SeqDeserializer::new(items.into_iter());
                let out = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(out)
            }
            Value::Map(entries) => {
                let mut map = MapDeserializer::new(entries.into_iter());
                let out = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(out)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self {
            Value::Null => visitor.visit_none(),
            other => visitor.visit_some(other),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        visitor.visit_newtype_struct(self)
    }

    /// Null, and an empty list (no positional arguments), are `()`.
    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self {
            Value::Null => visitor.visit_unit(),
            Value::List(items) if items.is_empty() => visitor.visit_unit(),
            other => Err(de::Error::invalid_type(
                other.unexpected(),
                &"nothing (null or no arguments)",
            )),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        if is_value_enum(name) && std::ptr::eq(variants, VARIANTS) {
            return crate::value::hand_over(self, || visitor.visit_enum(HandedOver));
        }
        match self {
            Value::String(variant) => visitor.visit_enum(variant.into_deserializer()),
            Value::Map(entries) if entries.len() == 1 => {
                let mut map = MapDeserializer::new(entries.into_iter());
                visitor.visit_enum(de::value::MapAccessDeserializer::new(&mut map))
            }
            other => Err(de::Error::invalid_type(
                other.unexpected(),
                &"a variant name or a map with one entry",
            )),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf seq tuple tuple_struct map struct
        identifier ignored_any
    }
}

/// Presents the value handed over (see `value::hand_over`) to `Value`'s
/// own deserializer: a unit variant with the hand-off tag.
struct HandedOver;

impl<'de> de::EnumAccess<'de> for HandedOver {
    type Error = ValueError;
    type Variant = HandedOver;

    fn variant_seed<S: de::DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, HandedOver), ValueError> {
        let tag = IntoDeserializer::<ValueError>::into_deserializer(crate::value::TAG_HANDOFF);
        Ok((seed.deserialize(tag)?, HandedOver))
    }
}

impl<'de> de::VariantAccess<'de> for HandedOver {
    type Error = ValueError;

    fn unit_variant(self) -> Result<(), ValueError> {
        Ok(())
    }
    fn newtype_variant_seed<S: de::DeserializeSeed<'de>>(
        self,
        _seed: S,
    ) -> Result<S::Value, ValueError> {
        Err(de::Error::custom("a handed-over value is a unit variant"))
    }
    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        _visitor: V,
    ) -> Result<V::Value, ValueError> {
        Err(de::Error::custom("a handed-over value is a unit variant"))
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, ValueError> {
        Err(de::Error::custom("a handed-over value is a unit variant"))
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Point {
        x: i64,
        label: Option<String>,
        tags: Vec<String>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Shape {
        Empty,
        Circle(f64),
        Rect { w: u32, h: u32 },
        Pair(i8, i8),
    }

    #[test]
    fn from_value_moves_a_value_whole() {
        let mut deep = Value::Null;
        for _ in 0..200 {
            deep = Value::List(vec![deep]);
        }
        let back: Value = from_value(deep.clone()).unwrap();
        assert_eq!(back, deep);
        let pair: (Value, Value) =
            from_value(Value::List(vec![deep.clone(), Value::Null])).unwrap();
        assert_eq!(pair, (deep, Value::Null));
    }

    #[test]
    fn bytes_move_into_a_value_target_without_a_copy() {
        let b = bytes::Bytes::from(vec![7u8; 4096]);
        let args = Value::List(vec![Value::Bytes(b.clone()), Value::Int(1)]);
        let (v, n): (Value, i64) = from_value(args).unwrap();
        let Value::Bytes(shared) = v else {
            panic!("{v:?}")
        };
        assert_eq!((shared.as_ptr(), shared.len(), n), (b.as_ptr(), b.len(), 1));
        // A `Vec<u8>` target gets its own copy of the same bytes.
        let owned: serde_bytes_like::Buf = from_value(Value::Bytes(b.clone())).unwrap();
        assert_eq!(owned.0, b.to_vec());
    }

    /// A `Vec<u8>` read as bytes (what `serde_bytes::ByteBuf` does).
    mod serde_bytes_like {
        pub(super) struct Buf(pub(super) Vec<u8>);
        impl<'de> serde::Deserialize<'de> for Buf {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Buf, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = Buf;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("bytes")
                    }
                    fn visit_bytes<E>(self, v: &[u8]) -> Result<Buf, E> {
                        Ok(Buf(v.to_vec()))
                    }
                }
                d.deserialize_byte_buf(V)
            }
        }
    }

    #[test]
    fn structs_become_maps_and_back() {
        let p = Point {
            x: -3,
            label: None,
            tags: vec!["a".into()],
        };
        let v = to_value(&p).unwrap();
        let Value::Map(m) = &v else { panic!("{v:?}") };
        assert_eq!(m["x"], Value::Int(-3));
        assert_eq!(m["label"], Value::Null);
        assert_eq!(from_value::<Point>(v).unwrap(), p);
    }

    #[test]
    fn enums_use_external_tagging() {
        for s in [
            Shape::Empty,
            Shape::Circle(1.5),
            Shape::Rect { w: 2, h: 3 },
            Shape::Pair(-1, 1),
        ] {
            let v = to_value(&s).unwrap();
            assert_eq!(from_value::<Shape>(v).unwrap(), s);
        }
        assert_eq!(to_value(&Shape::Empty).unwrap(), Value::from("Empty"));
    }

    #[test]
    fn integers_out_of_range_are_errors_not_wraps() {
        assert!(to_value(&(i64::MAX as u64 + 1)).is_err());
        assert_eq!(to_value(&(i64::MAX as u64)).unwrap(), Value::Int(i64::MAX));
        assert!(from_value::<u8>(Value::Int(256)).is_err());
        assert!(from_value::<u64>(Value::Int(-1)).is_err());
    }

    #[test]
    fn wrong_shape_names_what_was_expected() {
        let err = from_value::<(i64, i64)>(Value::from("x")).unwrap_err();
        assert!(err.to_string().contains("tuple"), "{err}");
        let err = from_value::<(i64, i64)>(Value::List(vec![Value::Int(1)])).unwrap_err();
        assert!(err.to_string().contains('2'), "{err}");
        let err = from_value::<(i64, i64)>(Value::List(vec![Value::Int(1); 3])).unwrap_err();
        assert!(err.to_string().contains('3'), "{err}");
    }

    #[test]
    fn no_arguments_are_unit() {
        from_value::<()>(Value::List(vec![])).unwrap();
        from_value::<()>(Value::Null).unwrap();
        assert!(from_value::<()>(Value::List(vec![Value::Null])).is_err());
    }

    #[test]
    fn non_string_map_keys_are_refused() {
        let m: BTreeMap<i32, i32> = [(1, 2)].into();
        assert!(to_value(&m).is_err());
    }

    #[test]
    fn values_pass_through_unchanged() {
        let v = Value::Map(BTreeMap::from([
            ("b".to_owned(), Value::Bytes(vec![1].into())),
            (
                "l".to_owned(),
                Value::List(vec![Value::Null, Value::Float(0.5), Value::Bool(false)]),
            ),
            ("n".to_owned(), Value::Int(-7)),
            ("s".to_owned(), Value::from("x")),
        ]));
        assert_eq!(to_value(&v).unwrap(), v);
        assert_eq!(from_value::<Value>(v.clone()).unwrap(), v);
        let args: Vec<Value> = from_value(Value::List(vec![v.clone(), Value::Null])).unwrap();
        assert_eq!(args, [v, Value::Null]);
    }

    #[test]
    fn bytes_stay_bytes() {
        struct B;
        impl Serialize for B {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&[1, 2])
            }
        }
        assert_eq!(to_value(&B).unwrap(), Value::Bytes(vec![1, 2].into()));
    }
}
