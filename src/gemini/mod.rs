//! Everything that knows the Gemini wire format: URL shapes, model names in bodies, usage
//! metadata (with an incremental scanner for JSON / SSE / JSON-array streams) and
//! Gemini-shaped error bodies. Nothing here does I/O.

pub mod body;
pub mod error;
pub mod path;
pub mod usage;

pub use error::error_body;
pub use path::{parse_model_call, rewrite_model_in_path, ModelCall};
pub use usage::{Usage, UsageScanner};
