//! `Value` ↔ Rhai `Dynamic`, without loss for the types both have.

use netproc_wire::Value;
use rhai::{Array, Blob, Dynamic, Map};

use crate::ScriptError;

/// A `Value` as a script sees it: null → `()`, int → `INT` (i64), float →
/// `FLOAT` (f64), string, bytes → blob, list → array, map → object map.
pub(crate) fn to_dynamic(v: &Value) -> Dynamic {
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Int(i) => Dynamic::from_int(*i),
        Value::Float(f) => Dynamic::from_float(*f),
        Value::String(s) => Dynamic::from(s.clone()),
        Value::Bytes(b) => Dynamic::from_blob(b.to_vec()),
        Value::List(items) => Dynamic::from_array(items.iter().map(to_dynamic).collect::<Array>()),
        Value::Map(m) => {
            let map: Map = m
                .iter()
                .map(|(k, v)| (k.as_str().into(), to_dynamic(v)))
                .collect();
            Dynamic::from_map(map)
        }
    }
}

/// A script's result as a `Value`; types with no `Value` form (function
/// pointers, timestamps, custom types) are `invalid_argument`.
pub(crate) fn from_dynamic(d: Dynamic, depth: u32) -> Result<Value, ScriptError> {
    if depth > netproc_wire::DEFAULT_MAX_VALUE_DEPTH {
        return Err(ScriptError::InvalidArgument(
            "the result is nested too deeply".into(),
        ));
    }
    if d.is_unit() {
        return Ok(Value::Null);
    }
    if let Ok(b) = d.as_bool() {
        return Ok(Value::Bool(b));
    }
    if let Ok(i) = d.as_int() {
        return Ok(Value::Int(i));
    }
    if let Ok(f) = d.as_float() {
        return Ok(Value::Float(f));
    }
    if let Ok(c) = d.as_char() {
        return Ok(Value::String(c.to_string()));
    }
    if d.is_string() {
        return Ok(Value::String(d.into_string().unwrap_or_default()));
    }
    if d.is_blob() {
        return Ok(Value::Bytes(d.cast::<Blob>().into()));
    }
    if d.is_array() {
        let items = d.cast::<Array>();
        return items
            .into_iter()
            .map(|x| from_dynamic(x, depth + 1))
            .collect::<Result<_, _>>()
            .map(Value::List);
    }
    if d.is_map() {
        let map = d.cast::<Map>();
        return map
            .into_iter()
            .map(|(k, v)| Ok((k.to_string(), from_dynamic(v, depth + 1)?)))
            .collect::<Result<_, _>>()
            .map(Value::Map);
    }
    Err(ScriptError::InvalidArgument(format!(
        "a script value of type {} cannot be returned",
        d.type_name()
    )))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            any::<f64>()
                .prop_filter("NaN", |f| !f.is_nan())
                .prop_map(Value::Float),
            ".{0,8}".prop_map(Value::String),
            proptest::collection::vec(any::<u8>(), 0..8).prop_map(|b| Value::Bytes(b.into())),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::List),
                proptest::collection::btree_map(".{0,4}", inner, 0..4).prop_map(Value::Map),
            ]
        })
    }

    proptest! {
        #[test]
        fn values_round_trip_through_dynamic(v in arb_value()) {
            prop_assert_eq!(from_dynamic(to_dynamic(&v), 0).unwrap(), v);
        }
    }

    #[test]
    fn unsupported_types_are_invalid_arguments() {
        let fnptr = Dynamic::from(rhai::FnPtr::new("f").unwrap());
        assert!(matches!(
            from_dynamic(fnptr, 0),
            Err(ScriptError::InvalidArgument(_))
        ));
        let m: BTreeMap<String, Value> = BTreeMap::new();
        assert_eq!(
            from_dynamic(to_dynamic(&Value::Map(m.clone())), 0).unwrap(),
            Value::Map(m)
        );
    }
}
