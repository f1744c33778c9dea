//! The `xx_gateway` source: exact, incremental active-user counts from an
//! xx network gateway's `client_bloom_filters` table.

pub mod bloom;
pub mod epochs;
