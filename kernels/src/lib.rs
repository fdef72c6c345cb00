//! CPU kernels for the portable driver.

pub mod matmul;
pub mod memory;
pub mod packed;
pub mod quant;
pub mod vector;

pub use matmul::{gather_rows, matmul, WeightMatrix};
