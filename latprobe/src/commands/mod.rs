//! One module per latprobe command.

pub mod func;
pub mod runqlat;
pub mod runqslower;
