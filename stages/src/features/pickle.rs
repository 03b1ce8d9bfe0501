//! A small Python pickle virtual machine, enough for what `torch.save` writes: tensors (by
//! persistent storage reference), dicts, lists, tuples and scalars. It never runs code: the only
//! callables it knows are the tensor and container rebuilders it implements itself.

use std::collections::HashMap;

use super::Dtype;

/// A tensor in a `torch.save` archive: where its storage is and how to view it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub dtype: Dtype,
    /// Name of the storage record (`<archive>/data/<key>`).
    pub storage: String,
    /// Offset into the storage, in elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// A decoded pickle value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A class or function reference, `module.name`.
    Global(String),
    /// A storage reference (`('storage', type, key, location, numel)`).
    Storage {
        dtype: Dtype,
        key: String,
    },
    Tensor(TensorRef),
}

impl Value {
    fn as_usize(&self) -> Option<usize> {
        match self {
            Value::Int(i) => usize::try_from(*i).ok(),
            _ => None,
        }
    }

    fn as_usizes(&self) -> Option<Vec<usize>> {
        match self {
            Value::Tuple(v) | Value::List(v) => v.iter().map(Value::as_usize).collect(),
            _ => None,
        }
    }
}

enum Slot {
    Mark,
    Val(Value),
}

/// Decodes one pickle. Errors are plain messages; the caller adds the file name.
pub fn load(bytes: &[u8]) -> Result<Value, String> {
    let mut vm = Vm { bytes, pos: 0, stack: Vec::new(), memo: HashMap::new() };
    vm.run()
}

struct Vm<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    memo: HashMap<u32, Value>,
}

impl Vm<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or("pickle is truncated")?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.bytes[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("pickle is truncated")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn string(&mut self, n: usize) -> Result<String, String> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "pickle holds invalid UTF-8".into())
    }

    fn push(&mut self, v: Value) {
        self.stack.push(Slot::Val(v));
    }

    fn pop(&mut self) -> Result<Value, String> {
        match self.stack.pop() {
            Some(Slot::Val(v)) => Ok(v),
            _ => Err("pickle stack underflow".into()),
        }
    }

    fn top(&mut self) -> Result<&mut Value, String> {
        match self.stack.last_mut() {
            Some(Slot::Val(v)) => Ok(v),
            _ => Err("pickle stack underflow".into()),
        }
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let mut out = Vec::new();
        loop {
            match self.stack.pop() {
                Some(Slot::Mark) => break,
                Some(Slot::Val(v)) => out.push(v),
                None => return Err("pickle MARK missing".into()),
            }
        }
        out.reverse();
        Ok(out)
    }

    fn memo_get(&self, i: u32) -> Result<Value, String> {
        self.memo.get(&i).cloned().ok_or_else(|| format!("pickle memo {i} missing"))
    }

    fn run(&mut self) -> Result<Value, String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                }
                0x95 => {
                    self.take(8)?;
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Slot::Mark),
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v.into()))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v.into()))
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v.into()))
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.u8()? as usize } else { self.u32()? as usize };
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err("pickle integer too large".into());
                    }
                    let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) { 0xff } else { 0 };
                    let mut buf = [fill; 8];
                    buf[..n].copy_from_slice(b);
                    self.push(Value::Int(i64::from_le_bytes(buf)))
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes"));
                    self.push(Value::Float(v))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push(Value::Str(s))
                }
                0x8c | b'U' => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.push(Value::Str(s))
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push(Value::Str(s))
                }
                b'B' | b'C' => {
                    let n = if op == b'B' { self.u32()? as usize } else { self.u8()? as usize };
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b))
                }
                b')' => self.push(Value::Tuple(Vec::new())),
                b']' => self.push(Value::List(Vec::new())),
                b'}' => self.push(Value::Dict(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = (0..n).map(|_| self.pop()).collect::<Result<Vec<_>, _>>()?;
                    items.reverse();
                    self.push(Value::Tuple(items))
                }
                b'q' => {
                    let i = self.u8()?.into();
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' => {
                    let i = self.u8()?.into();
                    let v = self.memo_get(i)?;
                    self.push(v)
                }
                b'j' => {
                    let i = self.u32()?;
                    let v = self.memo_get(i)?;
                    self.push(v)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(format!("{module}.{name}")))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.push(Value::Global(format!("{m}.{n}"))),
                        _ => return Err("pickle STACK_GLOBAL without names".into()),
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        _ => return Err("pickle APPEND to a non-list".into()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        _ => return Err("pickle APPENDS to a non-list".into()),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Value::Dict(d) => d.push((k, v)),
                        _ => return Err("pickle SETITEM on a non-dict".into()),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let mut it = items.into_iter();
                    let mut pairs = Vec::new();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    match self.top()? {
                        Value::Dict(d) => d.extend(pairs),
                        _ => return Err("pickle SETITEMS on a non-dict".into()),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent(pid)?;
                    self.push(v)
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = reduce(callable, args)?;
                    self.push(v)
                }
                b'b' => {
                    // State for an object we rebuilt ourselves (OrderedDict, tensor hooks): not needed.
                    self.pop()?;
                }
                other => {
                    return Err(format!("unsupported pickle opcode 0x{other:02x} at byte {}", self.pos - 1));
                }
            }
        }
    }
}

fn storage_dtype(class: &str) -> Option<Dtype> {
    Some(match class.rsplit('.').next()? {
        "FloatStorage" => Dtype::F32,
        "HalfStorage" => Dtype::F16,
        "BFloat16Storage" => Dtype::BF16,
        "DoubleStorage" => Dtype::F64,
        "LongStorage" => Dtype::I64,
        "IntStorage" => Dtype::I32,
        "ShortStorage" => Dtype::I16,
        "CharStorage" => Dtype::I8,
        "ByteStorage" => Dtype::U8,
        "BoolStorage" => Dtype::Bool,
        _ => return None,
    })
}

fn persistent(pid: Value) -> Result<Value, String> {
    let Value::Tuple(items) = pid else {
        return Err("unsupported persistent id".into());
    };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(class), key, ..] if tag == "storage" => {
            let dtype = storage_dtype(class).ok_or_else(|| format!("unsupported storage type {class}"))?;
            let key = match key {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                _ => return Err("storage key is not a string".into()),
            };
            Ok(Value::Storage { dtype, key })
        }
        _ => Err("unsupported persistent id".into()),
    }
}

fn reduce(callable: Value, args: Value) -> Result<Value, String> {
    let Value::Global(name) = callable else {
        return Err("pickle calls a non-global".into());
    };
    let Value::Tuple(args) = args else {
        return Err(format!("{name} called without an argument tuple"));
    };
    match name.as_str() {
        "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
            let bad = || format!("{name} with unexpected arguments");
            let [Value::Storage { dtype, key }, offset, shape, stride, ..] = args.as_slice() else {
                return Err(bad());
            };
            Ok(Value::Tensor(TensorRef {
                dtype: *dtype,
                storage: key.clone(),
                offset: offset.as_usize().ok_or_else(bad)?,
                shape: shape.as_usizes().ok_or_else(bad)?,
                stride: stride.as_usizes().ok_or_else(bad)?,
            }))
        }
        "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
            args.into_iter().next().ok_or_else(|| format!("{name} without data"))
        }
        "collections.OrderedDict" => Ok(Value::Dict(Vec::new())),
        "builtins.set" | "builtins.frozenset" => Ok(Value::List(Vec::new())),
        other => {
            Err(format!("the file holds a Python object of type {other}, which is not a tensor or a dict of tensors"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_scalars_containers_and_memo() {
        // pickle.dumps({'a': [1, -2, 300, 70000], 'b': (1.5, True, None), 'c': 'x'}, protocol=2)
        let bytes = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffM,\x01J\x70\x11\x01\x00eX\x01\x00\x00\x00bq\x03G?\xf8\x00\x00\x00\x00\x00\x00\x88N\x87q\x04X\x01\x00\x00\x00cq\x05h\x01u.";
        let v = load(bytes).unwrap();
        let Value::Dict(items) = v else { panic!() };
        assert_eq!(
            items[0],
            (
                Value::Str("a".into()),
                Value::List(vec![Value::Int(1), Value::Int(-2), Value::Int(300), Value::Int(70000)])
            )
        );
        assert_eq!(items[1].1, Value::Tuple(vec![Value::Float(1.5), Value::Bool(true), Value::None]));
        assert_eq!(items[2].1, Value::Str("a".into()), "BINGET returns the memoised value");
    }

    #[test]
    fn truncated_and_unknown_input_are_errors_not_panics() {
        assert_eq!(load(b"\x80\x02X\x05\x00\x00\x00ab").unwrap_err(), "pickle is truncated");
        assert!(load(b"\x80\x02\xff").unwrap_err().contains("opcode 0xff"));
        assert!(load(b"cos\nsystem\n(X\x02\x00\x00\x00lstR.").unwrap_err().contains("os.system"));
        assert!(load(b"").is_err());
    }
}
