//! Format strings: `name[:key=value,...]`, parsed strictly (unknown keys are errors) and printed back
//! canonically, so that a config in a JSON result or a plan file round-trips exactly.

use crate::error::{parse_err, Result};
use std::collections::BTreeMap;

/// The key/value parameters of one format string, consumed by the format's parser.
#[derive(Debug, Clone)]
pub struct Params {
    input: String,
    name: String,
    values: BTreeMap<String, String>,
}

impl Params {
    /// Splits `name:key=value,...`; rejects empty names, empty keys and repeated keys.
    pub fn parse(input: &str) -> Result<Self> {
        let s = input.trim();
        let (name, rest) = match s.split_once(':') {
            Some((n, r)) => (n.trim(), Some(r)),
            None => (s, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(parse_err(
                input,
                "expected a format name such as fp16, kivi, asymkv, qjl, decoquant or rvq",
            ));
        }
        let mut values = BTreeMap::new();
        if let Some(rest) = rest {
            for kv in rest.split(',') {
                let kv = kv.trim();
                if kv.is_empty() {
                    continue;
                }
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| parse_err(input, format!("'{kv}' is not key=value")))?;
                let (k, v) = (k.trim(), v.trim());
                if k.is_empty() || v.is_empty() {
                    return Err(parse_err(
                        input,
                        format!("'{kv}' has an empty key or value"),
                    ));
                }
                if values
                    .insert(k.to_ascii_lowercase(), v.to_string())
                    .is_some()
                {
                    return Err(parse_err(input, format!("key '{k}' given twice")));
                }
            }
        }
        Ok(Self {
            input: input.to_string(),
            name: name.to_ascii_lowercase(),
            values,
        })
    }

    /// The format name, lower-cased.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The original text, for error messages.
    pub fn input(&self) -> &str {
        &self.input
    }

    /// Takes an unsigned integer parameter, or its default; checks `lo <= v <= hi`.
    pub fn usize(&mut self, key: &str, default: usize, lo: usize, hi: usize) -> Result<usize> {
        let v = match self.values.remove(key) {
            None => default,
            Some(s) => s
                .parse::<usize>()
                .map_err(|_| parse_err(&self.input, format!("{key}={s}: expected an integer")))?,
        };
        if v < lo || v > hi {
            return Err(parse_err(
                &self.input,
                format!("{key}={v}: must be in {lo}..={hi}"),
            ));
        }
        Ok(v)
    }

    /// Takes an integer parameter that must be one of `allowed`.
    pub fn choice(&mut self, key: &str, default: usize, allowed: &[usize]) -> Result<usize> {
        let v = self.usize(key, default, 0, usize::MAX)?;
        if !allowed.contains(&v) {
            return Err(parse_err(
                &self.input,
                format!("{key}={v}: must be one of {allowed:?}"),
            ));
        }
        Ok(v)
    }

    /// Takes a u64 (seeds).
    pub fn u64(&mut self, key: &str, default: u64) -> Result<u64> {
        match self.values.remove(key) {
            None => Ok(default),
            Some(s) => s
                .parse::<u64>()
                .map_err(|_| parse_err(&self.input, format!("{key}={s}: expected an integer"))),
        }
    }

    /// Takes a string parameter (file paths, mode names).
    pub fn string(&mut self, key: &str) -> Option<String> {
        self.values.remove(key)
    }

    /// Takes a word from a fixed list.
    pub fn word(&mut self, key: &str, default: &str, allowed: &[&str]) -> Result<String> {
        let v = self
            .values
            .remove(key)
            .unwrap_or_else(|| default.to_string())
            .to_ascii_lowercase();
        if !allowed.contains(&v.as_str()) {
            return Err(parse_err(
                &self.input,
                format!("{key}={v}: must be one of {allowed:?}"),
            ));
        }
        Ok(v)
    }

    /// Fails on any key the format's parser did not take, naming the keys it does take.
    pub fn finish(self, known: &[&str]) -> Result<()> {
        if let Some(k) = self.values.keys().next() {
            return Err(parse_err(
                &self.input,
                format!(
                    "unknown key '{k}' for {}; known keys: {}",
                    self.name,
                    known.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let mut p = Params::parse("qjl:m=256, seed=3").unwrap();
        assert_eq!(p.name(), "qjl");
        assert_eq!(p.usize("m", 0, 1, 4096).unwrap(), 256);
        assert_eq!(p.u64("seed", 0).unwrap(), 3);
        p.finish(&["m", "seed"]).unwrap();
        assert!(Params::parse("").is_err());
        assert!(Params::parse("qjl:m").is_err());
        assert!(Params::parse("qjl:m=1,m=2").is_err());
        let mut p = Params::parse("qjl:m=abc").unwrap();
        assert!(p.usize("m", 0, 0, 10).is_err());
        let p = Params::parse("qjl:zz=1").unwrap();
        let e = p.finish(&["m"]).unwrap_err().to_string();
        assert!(e.contains("zz") && e.contains("known keys"), "{e}");
    }
}
