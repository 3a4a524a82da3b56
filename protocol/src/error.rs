//! Validation errors that name the field at fault.

use std::fmt;

/// A value that failed validation, with the dotted path of the field it came from.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct FieldError {
    /// Dotted path of the offending field, e.g. `gemm.f16.tflops[2]`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { field: field.into(), problem: problem.into() }
    }

    /// Prefixes the field path (`memory` + `total_bytes` -> `memory.total_bytes`).
    pub fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() { parent.to_string() } else { format!("{parent}.{}", self.field) };
        self
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}`: {}", self.field, self.problem)
    }
}

/// Checks that `v` is finite and strictly positive.
pub fn positive(field: &str, v: f64) -> Result<(), FieldError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(FieldError::new(field, format!("must be finite and positive, got {v}")))
    }
}
