//! kvq: the embeddable GPU backend (placeholder until the runtime lands).
