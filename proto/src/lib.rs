//! Docket's wire contract, generated from `proto/docket/v1/*.proto`, and the internal
//! records that the broker and the scheduler store.
//!
//! Other languages generate their clients from the same `.proto` files.

#![forbid(unsafe_code)]

/// The public API, package `docket.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::large_enum_variant)]
    tonic::include_proto!("docket.v1");
}

/// Records stored by the broker and the scheduler, package `docket.storage.v1`. Not part
/// of the public API.
pub mod storage {
    pub use self::v1::*;

    /// The generated code names the public package as `super::super::v1`, so it sits one
    /// module deeper than its package name.
    pub mod v1 {
        #![allow(missing_docs)]
        tonic::include_proto!("docket.storage.v1");
    }
}

/// Encoded `FileDescriptorSet` of every `.proto` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("docket_descriptor");

/// Header of the Subscribe response's initial metadata that names the stream in
/// `Broker.StopDeliveries`.
pub const SUBSCRIPTION_ID_HEADER: &str = "docket-subscription-id";
