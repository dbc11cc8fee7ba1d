//! kvq-model
