//! One module per latprobe command.

pub mod doctor;
pub mod flame;
pub mod func;
pub mod generate;
pub mod lock;
pub mod merge;
pub mod runqlat;
pub mod runqslower;
pub mod tcp;
