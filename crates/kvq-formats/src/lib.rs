//! kvq-formats: the KV-cache formats of kvq, with no GPU anywhere.
//!
//! | format | config (defaults) | keys | values |
//! |---|---|---|---|
//! | fp16 | `fp16` | f16 | f16 |
//! | KIVI / AsymKV | `asymkv:lk=16,lv=0,hi=2,lo=1,group=32,window=128` | per-channel b-bit | per-token b-bit |
//! | QJL | `qjl:m=256,m0=512,l0=15,outliers=8,v=2,group=32,buffer=128,seed=0` | JL sign bits + norm | per-token 2-bit |
//! | DecoQuant | `decoquant:bits=4,chunk=1024,sub=16` | b-bit T_L x f16 T_S | same |
//! | RVQ | `rvq:group=32,codes=2048,depth=8,codebooks=FILE` | pre-RoPE residual VQ | residual VQ |
//! | KLT | `klt:bits=3,window=0,file=FILE` | weighted KLT + Lloyd-Max codes | same |
//!
//! How to add a format: write `formats/<name>.rs` (a [`Format`] that builds a [`Codec`], with the
//! paper, bit accounting and byte layout in its module docs), add one line to
//! [`formats::REGISTRY`], document the layout in docs/FORMATS.md, and add `kernels/formats/<name>.cu`.

pub mod bits;
pub mod cache;
pub mod calibrate;
pub mod codec;
pub mod config;
pub mod ecsq;
pub mod error;
pub mod formats;
pub mod linalg;
pub mod plan;
pub mod rope;
pub mod tcq;
pub mod testutil;
pub mod transform;

pub use cache::{CacheBytes, LayerCache};
pub use codec::{Codec, Format, FormatRef, KernelSpec, Stream, StreamCtx};
pub use config::Params;
pub use error::{FormatError, Result};
pub use formats::parse_format;
pub use plan::KvPlan;
pub use rope::{Rope, RopeStyle};
