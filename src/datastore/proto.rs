//! Generated types and gRPC stubs of the etcd v3 API (`proto/`), under etcd's package
//! names so requests from real etcd clients decode unchanged.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
