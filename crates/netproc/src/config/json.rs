//! JSON ↔ netproc [`Value`], for command lines and files.

use crate::wire::Value;

/// A JSON value as a netproc value: integers that fit stay integers,
/// other numbers are floats; an integer above `i64::MAX` is refused.
/// The serde bridge of the wire crate does the work.
pub fn to_value(j: serde_json::Value) -> Result<Value, String> {
    crate::wire::to_value(&j).map_err(|e| e.to_string())
}

/// A netproc value as JSON; bytes become an array of numbers (which
/// serde_json's own deserializer would refuse, so this stays a walk).
pub fn from_value(v: Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => b.into(),
        Value::Int(i) => i.into(),
        Value::Float(f) => {
            serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, Into::into)
        }
        Value::String(s) => s.into(),
        Value::Bytes(b) => b.into_iter().map(serde_json::Value::from).collect(),
        Value::List(l) => l.into_iter().map(from_value).collect(),
        Value::Map(m) => m
            .into_iter()
            .map(|(k, v)| (k, from_value(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
    }
}

#[cfg(test)]
mod json_tests {
    use super::{from_value, to_value};
    use crate::wire::Value;

    #[test]
    fn json_round_trips_and_refuses_integers_past_i64() {
        let j = serde_json::json!({"a": [1, -2, 2.5, "x", null, true], "b": {}});
        let v = to_value(j.clone()).unwrap();
        let Value::Map(m) = &v else { panic!("{v:?}") };
        assert_eq!(
            m["a"],
            Value::List(vec![
                Value::Int(1),
                Value::Int(-2),
                Value::Float(2.5),
                Value::from("x"),
                Value::Null,
                Value::Bool(true)
            ])
        );
        assert_eq!(from_value(v), j);
        assert!(to_value(serde_json::json!(u64::MAX)).is_err());
        assert_eq!(
            from_value(Value::Bytes(vec![1, 2].into())),
            serde_json::json!([1, 2])
        );
    }
}
