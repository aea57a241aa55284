//! The nouns every layer shares: plain types with their parsing, formatting and the rules
//! that need nothing but themselves. It imports nothing of the crate but `digest` and `utc`,
//! so the registry below the domain modules can store what they speak of without importing
//! them (ARCHITECTURE.md, "Layers").

pub mod access;
pub mod audit;
pub mod release;
pub mod vocabulary;
pub mod webhook;
