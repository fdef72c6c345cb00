//! The small expression language used in spec attributes and parameters:
//! `hidden / heads`, `i % 6 != 5`, `layer_types[i] == 'sliding_attention'`,
//! `has(rope_scaling) ? rope_scaling.factor : 1.0`.
//!
//! Arithmetic follows Python where it matters: `/` divides exactly (an int
//! when both sides are ints and the division is exact, else a float), `//`
//! floors, `%` is the remainder of ints.

use crate::value::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Lit(Value),
    Name(String, usize),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>, usize),
    Cond(Box<Expr>, Box<Expr>, Box<Expr>),
    Index(Box<Expr>, Box<Expr>, usize),
    Field(Box<Expr>, String, usize),
    Call(String, Vec<Expr>, usize),
    List(Vec<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    FloorDiv,
    Rem,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

/// An error inside an expression; `offset` is a byte offset into its text.
#[derive(Debug, Clone, PartialEq)]
pub struct ExprError {
    pub offset: usize,
    pub message: String,
}

fn err<T>(offset: usize, message: impl Into<String>) -> Result<T, ExprError> {
    Err(ExprError {
        offset,
        message: message.into(),
    })
}

pub const FUNCTIONS: [&str; 10] = [
    "min", "max", "sqrt", "float", "int", "len", "has", "default", "pow", "contains",
];

// ---------------------------------------------------------------- parsing

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(Value),
    Str(String),
    Ident(String),
    Sym(&'static str),
}

const SYMBOLS: [&str; 23] = [
    "//", "==", "!=", "<=", ">=", "&&", "||", "+", "-", "*", "/", "%", "<", ">", "!", "?", ":",
    "(", ")", "[", "]", ",", ".",
];

fn tokenize(src: &str) -> Result<Vec<(Tok, usize)>, ExprError> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i] as char;
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric()
                    || bytes[i] == b'.'
                    || bytes[i] == b'_'
                    || ((bytes[i] == b'-' || bytes[i] == b'+')
                        && matches!(bytes[i - 1], b'e' | b'E')))
            {
                i += 1;
            }
            let text = src[start..i].replace('_', "");
            let value = if let Ok(v) = text.parse::<i64>() {
                Value::Int(v)
            } else if let Ok(v) = text.parse::<f64>() {
                Value::Float(v)
            } else {
                return err(start, format!("invalid number `{text}`"));
            };
            out.push((Tok::Num(value), start));
        } else if c == '\'' || c == '"' {
            let start = i;
            i += 1;
            let body_start = i;
            while i < bytes.len() && bytes[i] as char != c {
                i += 1;
            }
            if i >= bytes.len() {
                return err(start, "unterminated string");
            }
            out.push((Tok::Str(src[body_start..i].to_string()), start));
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            out.push((Tok::Ident(src[start..i].to_string()), start));
        } else if let Some(sym) = SYMBOLS.iter().find(|s| src[i..].starts_with(**s)) {
            out.push((Tok::Sym(sym), i));
            i += sym.len();
        } else {
            return err(i, format!("unexpected character `{c}`"));
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(t, _)| t)
    }
    fn offset(&self) -> usize {
        self.toks.get(self.pos).map(|(_, o)| *o).unwrap_or(self.end)
    }
    fn eat(&mut self, sym: &str) -> bool {
        if self.peek() == Some(&Tok::Sym(sym_static(sym))) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, sym: &str) -> Result<(), ExprError> {
        if self.eat(sym) {
            Ok(())
        } else {
            err(self.offset(), format!("expected `{sym}`"))
        }
    }

    fn expr(&mut self) -> Result<Expr, ExprError> {
        let cond = self.binary(0)?;
        if self.eat("?") {
            let a = self.expr()?;
            self.expect(":")?;
            let b = self.expr()?;
            return Ok(Expr::Cond(Box::new(cond), Box::new(a), Box::new(b)));
        }
        Ok(cond)
    }

    /// Precedence climbing over the binary operators.
    fn binary(&mut self, min_prec: u8) -> Result<Expr, ExprError> {
        let mut lhs = self.unary()?;
        while let Some(Tok::Sym(sym)) = self.peek() {
            let Some((op, prec)) = binop(sym) else { break };
            if prec < min_prec {
                break;
            }
            let at = self.offset();
            self.pos += 1;
            let rhs = self.binary(prec + 1)?;
            lhs = Expr::Binary(op, Box::new(lhs), Box::new(rhs), at);
        }
        Ok(lhs)
    }

    fn unary(&mut self) -> Result<Expr, ExprError> {
        if self.eat("-") {
            return Ok(Expr::Unary(UnOp::Neg, Box::new(self.unary()?)));
        }
        if self.eat("!") {
            return Ok(Expr::Unary(UnOp::Not, Box::new(self.unary()?)));
        }
        self.postfix()
    }

    fn postfix(&mut self) -> Result<Expr, ExprError> {
        let mut e = self.primary()?;
        loop {
            let at = self.offset();
            if self.eat("[") {
                let idx = self.expr()?;
                self.expect("]")?;
                e = Expr::Index(Box::new(e), Box::new(idx), at);
            } else if self.eat(".") {
                match self.toks.get(self.pos) {
                    Some((Tok::Ident(name), _)) => {
                        let name = name.clone();
                        self.pos += 1;
                        e = Expr::Field(Box::new(e), name, at);
                    }
                    _ => return err(self.offset(), "expected a field name after `.`"),
                }
            } else {
                return Ok(e);
            }
        }
    }

    fn primary(&mut self) -> Result<Expr, ExprError> {
        let at = self.offset();
        let Some((tok, _)) = self.toks.get(self.pos).cloned() else {
            return err(at, "expected an expression");
        };
        self.pos += 1;
        match tok {
            Tok::Num(v) => Ok(Expr::Lit(v)),
            Tok::Str(s) => Ok(Expr::Lit(Value::Str(s))),
            Tok::Ident(name) => match name.as_str() {
                "true" => Ok(Expr::Lit(Value::Bool(true))),
                "false" => Ok(Expr::Lit(Value::Bool(false))),
                "null" => Ok(Expr::Lit(Value::Null)),
                _ if self.eat("(") => {
                    if !FUNCTIONS.contains(&name.as_str()) {
                        return err(
                            at,
                            format!(
                                "unknown function `{name}`{}",
                                did_you_mean(&name, FUNCTIONS.iter().copied())
                            ),
                        );
                    }
                    let args = self.list_until(")")?;
                    Ok(Expr::Call(name, args, at))
                }
                _ => Ok(Expr::Name(name, at)),
            },
            Tok::Sym("(") => {
                let e = self.expr()?;
                self.expect(")")?;
                Ok(e)
            }
            Tok::Sym("[") => Ok(Expr::List(self.list_until("]")?)),
            Tok::Sym(s) => err(at, format!("expected an expression, found `{s}`")),
        }
    }

    fn list_until(&mut self, close: &str) -> Result<Vec<Expr>, ExprError> {
        let mut items = Vec::new();
        if self.eat(close) {
            return Ok(items);
        }
        loop {
            items.push(self.expr()?);
            if self.eat(close) {
                return Ok(items);
            }
            self.expect(",")?;
        }
    }
}

fn sym_static(s: &str) -> &'static str {
    SYMBOLS.iter().find(|x| **x == s).copied().unwrap_or("")
}

fn binop(sym: &str) -> Option<(BinOp, u8)> {
    Some(match sym {
        "||" => (BinOp::Or, 1),
        "&&" => (BinOp::And, 2),
        "==" => (BinOp::Eq, 3),
        "!=" => (BinOp::Ne, 3),
        "<" => (BinOp::Lt, 3),
        "<=" => (BinOp::Le, 3),
        ">" => (BinOp::Gt, 3),
        ">=" => (BinOp::Ge, 3),
        "+" => (BinOp::Add, 4),
        "-" => (BinOp::Sub, 4),
        "*" => (BinOp::Mul, 5),
        "/" => (BinOp::Div, 5),
        "//" => (BinOp::FloorDiv, 5),
        "%" => (BinOp::Rem, 5),
        _ => return None,
    })
}

/// Parses an expression; errors carry the byte offset into `src`.
pub fn parse(src: &str) -> Result<Expr, ExprError> {
    let toks = tokenize(src)?;
    let mut p = Parser {
        toks,
        pos: 0,
        end: src.len(),
    };
    let e = p.expr()?;
    if p.pos < p.toks.len() {
        return err(p.offset(), "unexpected text after the expression");
    }
    Ok(e)
}

/// " (did you mean `x`?)" for the closest candidate, or "".
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    let best = candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((_, c)) => format!(" (did you mean `{c}`?)"),
        None => String::new(),
    }
}

pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

// ---------------------------------------------------------------- analysis

impl Expr {
    /// Every free name with its offset, in order of appearance.
    pub fn names(&self) -> Vec<(&str, usize)> {
        let mut out = Vec::new();
        self.collect_names(&mut out);
        out
    }

    fn collect_names<'a>(&'a self, out: &mut Vec<(&'a str, usize)>) {
        match self {
            Expr::Lit(_) => {}
            Expr::Name(n, at) => out.push((n, *at)),
            Expr::Unary(_, e) | Expr::Field(e, _, _) => e.collect_names(out),
            Expr::Binary(_, a, b, _) | Expr::Index(a, b, _) => {
                a.collect_names(out);
                b.collect_names(out);
            }
            Expr::Cond(c, a, b) => {
                c.collect_names(out);
                a.collect_names(out);
                b.collect_names(out);
            }
            Expr::Call(_, args, _) | Expr::List(args) => {
                args.iter().for_each(|a| a.collect_names(out))
            }
        }
    }
}

// ---------------------------------------------------------------- evaluation

/// Evaluates `e`, looking names up with `lookup`.
pub fn eval(e: &Expr, lookup: &dyn Fn(&str) -> Option<Value>) -> Result<Value, ExprError> {
    match e {
        Expr::Lit(v) => Ok(v.clone()),
        Expr::Name(n, at) => match lookup(n) {
            Some(v) => Ok(v),
            None => err(*at, format!("unknown name `{n}`")),
        },
        Expr::Unary(op, inner) => {
            let v = eval(inner, lookup)?;
            match (op, v) {
                (UnOp::Neg, Value::Int(i)) => Ok(Value::Int(-i)),
                (UnOp::Neg, Value::Float(f)) => Ok(Value::Float(-f)),
                (UnOp::Not, v) => match v.truthy() {
                    Some(b) => Ok(Value::Bool(!b)),
                    None => err(0, format!("`!` needs a bool, found {}", v.type_name())),
                },
                (_, v) => err(0, format!("`-` needs a number, found {}", v.type_name())),
            }
        }
        Expr::Binary(op, a, b, at) => {
            // Short-circuit so `has(x) && x > 0` works when x is null.
            if matches!(op, BinOp::And | BinOp::Or) {
                let av = truthy(eval(a, lookup)?, *at)?;
                if (*op == BinOp::And && !av) || (*op == BinOp::Or && av) {
                    return Ok(Value::Bool(av));
                }
                return Ok(Value::Bool(truthy(eval(b, lookup)?, *at)?));
            }
            binary(*op, eval(a, lookup)?, eval(b, lookup)?, *at)
        }
        Expr::Cond(c, a, b) => {
            if truthy(eval(c, lookup)?, 0)? {
                eval(a, lookup)
            } else {
                eval(b, lookup)
            }
        }
        Expr::Index(list, idx, at) => {
            let list = eval(list, lookup)?;
            let idx = eval(idx, lookup)?;
            match (&list, idx.as_i64()) {
                (Value::Str(text), Some(i)) => {
                    // Character patterns such as Nemotron-H's "M-M*-".
                    let chars: Vec<char> = text.chars().collect();
                    let n = chars.len() as i64;
                    let j = if i < 0 { i + n } else { i };
                    if j < 0 || j >= n {
                        return err(
                            *at,
                            format!("index {i} is out of range for a string of {n}"),
                        );
                    }
                    Ok(Value::Str(chars[j as usize].to_string()))
                }
                (Value::List(items), Some(i)) => {
                    let n = items.len() as i64;
                    let j = if i < 0 { i + n } else { i };
                    if j < 0 || j >= n {
                        return err(*at, format!("index {i} is out of range for a list of {n}"));
                    }
                    Ok(items[j as usize].clone())
                }
                _ => err(
                    *at,
                    format!("cannot index {} with {}", list.type_name(), idx.type_name()),
                ),
            }
        }
        Expr::Field(obj, name, at) => match eval(obj, lookup)? {
            Value::Object(map) => Ok(map.get(name).map(Value::from_json).unwrap_or(Value::Null)),
            Value::Null => Ok(Value::Null),
            v => err(
                *at,
                format!("`.{name}` needs an object, found {}", v.type_name()),
            ),
        },
        Expr::Call(f, args, at) => {
            let vals = args
                .iter()
                .map(|a| eval(a, lookup))
                .collect::<Result<Vec<_>, _>>()?;
            call(f, vals, *at)
        }
        Expr::List(items) => Ok(Value::List(
            items
                .iter()
                .map(|a| eval(a, lookup))
                .collect::<Result<_, _>>()?,
        )),
    }
}

fn truthy(v: Value, at: usize) -> Result<bool, ExprError> {
    match v.truthy() {
        Some(b) => Ok(b),
        None => err(
            at,
            format!("expected a bool, found {} `{v}`", v.type_name()),
        ),
    }
}

fn num(v: &Value, at: usize, what: &str) -> Result<f64, ExprError> {
    v.as_f64().ok_or_else(|| ExprError {
        offset: at,
        message: format!("{what} needs numbers, found {} `{v}`", v.type_name()),
    })
}

fn binary(op: BinOp, a: Value, b: Value, at: usize) -> Result<Value, ExprError> {
    use BinOp::*;
    use Value::{Float, Int};
    match op {
        Eq => return Ok(Value::Bool(values_equal(&a, &b))),
        Ne => return Ok(Value::Bool(!values_equal(&a, &b))),
        _ => {}
    }
    if let (Int(x), Int(y)) = (&a, &b) {
        let (x, y) = (*x, *y);
        let checked = |r: Option<i64>| {
            r.map(Int).ok_or_else(|| ExprError {
                offset: at,
                message: format!("integer overflow or division by zero in `{x} {op:?} {y}`"),
            })
        };
        return match op {
            Add => checked(x.checked_add(y)),
            Sub => checked(x.checked_sub(y)),
            Mul => checked(x.checked_mul(y)),
            Div if y != 0 && x % y == 0 => Ok(Int(x / y)),
            Div if y != 0 => Ok(Float(x as f64 / y as f64)),
            FloorDiv | Rem if y == 0 => err(at, "division by zero"),
            FloorDiv => Ok(Int(x.div_euclid(y))),
            Rem => Ok(Int(x.rem_euclid(y))),
            Lt => Ok(Value::Bool(x < y)),
            Le => Ok(Value::Bool(x <= y)),
            Gt => Ok(Value::Bool(x > y)),
            Ge => Ok(Value::Bool(x >= y)),
            Div => err(at, "division by zero"),
            Eq | Ne | And | Or => unreachable!("handled above"),
        };
    }
    let what = format!("`{}`", op_symbol(op));
    let (x, y) = (num(&a, at, &what)?, num(&b, at, &what)?);
    Ok(match op {
        Add => Float(x + y),
        Sub => Float(x - y),
        Mul => Float(x * y),
        Div => Float(x / y),
        FloorDiv => Float((x / y).floor()),
        Rem => Float(x % y),
        Lt => Value::Bool(x < y),
        Le => Value::Bool(x <= y),
        Gt => Value::Bool(x > y),
        Ge => Value::Bool(x >= y),
        Eq | Ne | And | Or => unreachable!("handled above"),
    })
}

fn values_equal(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn op_symbol(op: BinOp) -> &'static str {
    match op {
        BinOp::Add => "+",
        BinOp::Sub => "-",
        BinOp::Mul => "*",
        BinOp::Div => "/",
        BinOp::FloorDiv => "//",
        BinOp::Rem => "%",
        BinOp::Eq => "==",
        BinOp::Ne => "!=",
        BinOp::Lt => "<",
        BinOp::Le => "<=",
        BinOp::Gt => ">",
        BinOp::Ge => ">=",
        BinOp::And => "&&",
        BinOp::Or => "||",
    }
}

fn call(f: &str, args: Vec<Value>, at: usize) -> Result<Value, ExprError> {
    let arity = |n: usize| -> Result<(), ExprError> {
        if args.len() == n {
            Ok(())
        } else {
            err(
                at,
                format!("`{f}` takes {n} argument(s), got {}", args.len()),
            )
        }
    };
    match f {
        "has" => {
            arity(1)?;
            Ok(Value::Bool(args[0] != Value::Null))
        }
        "default" => {
            arity(2)?;
            let mut it = args.into_iter();
            let (a, b) = (it.next().unwrap(), it.next().unwrap());
            Ok(if a == Value::Null { b } else { a })
        }
        "contains" => {
            arity(2)?;
            match &args[0] {
                Value::List(items) => {
                    Ok(Value::Bool(items.iter().any(|v| values_equal(v, &args[1]))))
                }
                Value::Null => Ok(Value::Bool(false)),
                v => err(
                    at,
                    format!("`contains` needs a list, found {}", v.type_name()),
                ),
            }
        }
        "len" => {
            arity(1)?;
            match &args[0] {
                Value::List(l) => Ok(Value::Int(l.len() as i64)),
                Value::Str(s) => Ok(Value::Int(s.len() as i64)),
                v => err(at, format!("`len` needs a list, found {}", v.type_name())),
            }
        }
        "min" | "max" => {
            arity(2)?;
            let pick_first = match (&args[0], &args[1]) {
                (Value::Int(a), Value::Int(b)) => (f == "min") == (a <= b),
                (a, b) => {
                    let (x, y) = (num(a, at, f)?, num(b, at, f)?);
                    (f == "min") == (x <= y)
                }
            };
            Ok(args[if pick_first { 0 } else { 1 }].clone())
        }
        "sqrt" => {
            arity(1)?;
            Ok(Value::Float(num(&args[0], at, f)?.sqrt()))
        }
        "pow" => {
            arity(2)?;
            Ok(Value::Float(
                num(&args[0], at, f)?.powf(num(&args[1], at, f)?),
            ))
        }
        "float" => {
            arity(1)?;
            Ok(Value::Float(num(&args[0], at, f)?))
        }
        "int" => {
            arity(1)?;
            Ok(Value::Int(num(&args[0], at, f)?.trunc() as i64))
        }
        _ => err(at, format!("unknown function `{f}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(src: &str) -> Value {
        let e = parse(src).unwrap();
        eval(&e, &|n| match n {
            "hidden" => Some(Value::Int(64)),
            "heads" => Some(Value::Int(4)),
            "types" => Some(Value::List(vec![
                Value::Str("a".into()),
                Value::Str("b".into()),
            ])),
            "nothing" => Some(Value::Null),
            _ => None,
        })
        .unwrap()
    }

    #[test]
    fn arithmetic_follows_python() {
        assert_eq!(ev("hidden / heads"), Value::Int(16));
        assert_eq!(ev("7 / 2"), Value::Float(3.5));
        assert_eq!(ev("7 // 2"), Value::Int(3));
        assert_eq!(ev("-7 % 3"), Value::Int(2));
        assert_eq!(ev("1 + 2 * 3"), Value::Int(7));
        assert_eq!(ev("1e-6 * 2"), Value::Float(2e-6));
        assert_eq!(ev("sqrt(16)"), Value::Float(4.0));
    }

    #[test]
    fn conditions_lists_and_null() {
        assert_eq!(ev("types[1] == 'b'"), Value::Bool(true));
        assert_eq!(ev("types[-1]"), Value::Str("b".into()));
        assert_eq!(ev("has(nothing) && nothing.x > 1"), Value::Bool(false));
        assert_eq!(ev("default(nothing, 3)"), Value::Int(3));
        assert_eq!(
            ev("hidden > 10 ? 'big' : 'small'"),
            Value::Str("big".into())
        );
        assert_eq!(ev("!(1 == 2) || false"), Value::Bool(true));
        assert_eq!(ev("'M-*'[2]"), Value::Str("*".into()));
        assert_eq!(
            ev("contains(types, 'b') && !contains(nothing, 1)"),
            Value::Bool(true)
        );
    }

    #[test]
    fn errors_point_at_the_offending_text() {
        let e = parse("hidden + ").unwrap_err();
        assert_eq!(e.offset, 9);
        let e = parse("hiden $ 2").unwrap_err();
        assert_eq!(e.offset, 6);
        let e = parse("sqr(2)").unwrap_err();
        assert!(e.message.contains("did you mean `sqrt`"), "{}", e.message);
        let e = eval(&parse("1 + missing").unwrap(), &|_| None).unwrap_err();
        assert_eq!(
            (e.offset, e.message.as_str()),
            (4, "unknown name `missing`")
        );
        let e = eval(&parse("types[5]").unwrap(), &|_| Some(Value::List(vec![]))).unwrap_err();
        assert!(e.message.contains("out of range"));
    }
}
