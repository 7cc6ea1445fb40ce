//! One module per latprobe command.

pub mod func;
