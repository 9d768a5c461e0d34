//! Metadata values: the GGUF value types and their little-endian encoding.

// ---------------------------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------------------------

/// A metadata value, with its GGUF value type.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array: elements all of one (non-array) type, which the file records even when
/// the array is empty.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Value {
    /// The GGUF value type id (`gguf_type`: UINT8 = 0 .. FLOAT64 = 12, ARRAY = 9).
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// The value without its type id.
    pub(super) fn put_payload(&self, buf: &mut Vec<u8>) {
        match self {
            Value::U8(v) => buf.push(*v),
            Value::I8(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::U16(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::I16(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::U32(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::I32(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::F32(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::Bool(v) => buf.push(u8::from(*v)),
            Value::String(s) => put_string(buf, s),
            Value::Array(a) => a.put(buf),
            Value::U64(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::I64(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::F64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        }
    }
}

impl Array {
    /// The GGUF value type id of the elements.
    pub fn elem_type_id(&self) -> u32 {
        match self {
            Array::U8(_) => 0,
            Array::I8(_) => 1,
            Array::U16(_) => 2,
            Array::I16(_) => 3,
            Array::U32(_) => 4,
            Array::I32(_) => 5,
            Array::F32(_) => 6,
            Array::Bool(_) => 7,
            Array::String(_) => 8,
            Array::U64(_) => 10,
            Array::I64(_) => 11,
            Array::F64(_) => 12,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element type, count, elements.
    pub(super) fn put(&self, buf: &mut Vec<u8>) {
        fn all<T: Copy, const N: usize>(buf: &mut Vec<u8>, items: &[T], le: fn(T) -> [u8; N]) {
            items.iter().for_each(|x| buf.extend_from_slice(&le(*x)));
        }
        buf.extend_from_slice(&self.elem_type_id().to_le_bytes());
        buf.extend_from_slice(&(self.len() as u64).to_le_bytes());
        match self {
            Array::U8(v) => buf.extend_from_slice(v),
            Array::I8(v) => all(buf, v, i8::to_le_bytes),
            Array::U16(v) => all(buf, v, u16::to_le_bytes),
            Array::I16(v) => all(buf, v, i16::to_le_bytes),
            Array::U32(v) => all(buf, v, u32::to_le_bytes),
            Array::I32(v) => all(buf, v, i32::to_le_bytes),
            Array::F32(v) => all(buf, v, f32::to_le_bytes),
            Array::Bool(v) => all(buf, v, |b| [u8::from(b)]),
            Array::String(v) => v.iter().for_each(|s| put_string(buf, s)),
            Array::U64(v) => all(buf, v, u64::to_le_bytes),
            Array::I64(v) => all(buf, v, i64::to_le_bytes),
            Array::F64(v) => all(buf, v, f64::to_le_bytes),
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $variant:ident),* $(,)?) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Value::$variant(v)
            }
        }
        impl From<Vec<$t>> for Value {
            fn from(v: Vec<$t>) -> Self {
                Value::Array(Array::$variant(v))
            }
        }
    )*};
}

value_from!(
    u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
    bool => Bool, String => String, u64 => U64, i64 => I64, f64 => F64,
);

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::String(v.to_owned())
    }
}

impl From<Array> for Value {
    fn from(v: Array) -> Self {
        Value::Array(v)
    }
}

/// A GGUF string: u64 byte length, then the UTF-8 bytes.
pub(super) fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}
