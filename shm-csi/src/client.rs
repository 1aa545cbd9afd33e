//! A blocking CSI client over a unix socket, for tests and tools: it drives
//! the plugin exactly as kubelet does (gRPC over the socket), without
//! making its callers async.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};
/// The status and code types of the client results, for callers without tonic.
pub use tonic::{Code, Status};

use crate::csi::{
    GetPluginCapabilitiesRequest, GetPluginInfoRequest, GetPluginInfoResponse,
    NodeGetCapabilitiesRequest, NodeGetInfoRequest, NodeGetInfoResponse, NodePublishVolumeRequest,
    NodeUnpublishVolumeRequest, ProbeRequest, identity_client::IdentityClient,
    node_client::NodeClient,
};

pub struct Client {
    rt: tokio::runtime::Runtime,
    identity: IdentityClient<Channel>,
    node: NodeClient<Channel>,
}

impl Client {
    /// Connects to the plugin's socket.
    pub fn connect(socket: &Path) -> Result<Self, tonic::transport::Error> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let path: PathBuf = socket.to_path_buf();
        let channel = rt.block_on(async move {
            // The URI is required by the API and ignored by the connector.
            Endpoint::from_static("http://[::]:50051")
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
        })?;
        Ok(Self {
            rt,
            identity: IdentityClient::new(channel.clone()),
            node: NodeClient::new(channel),
        })
    }

    pub fn plugin_info(&mut self) -> Result<GetPluginInfoResponse, Status> {
        let c = &mut self.identity;
        self.rt
            .block_on(c.get_plugin_info(GetPluginInfoRequest {}))
            .map(tonic::Response::into_inner)
    }

    pub fn plugin_capabilities(&mut self) -> Result<usize, Status> {
        let c = &mut self.identity;
        self.rt
            .block_on(c.get_plugin_capabilities(GetPluginCapabilitiesRequest {}))
            .map(|r| r.into_inner().capabilities.len())
    }

    pub fn probe(&mut self) -> Result<Option<bool>, Status> {
        let c = &mut self.identity;
        self.rt
            .block_on(c.probe(ProbeRequest {}))
            .map(|r| r.into_inner().ready)
    }

    pub fn node_info(&mut self) -> Result<NodeGetInfoResponse, Status> {
        let c = &mut self.node;
        self.rt
            .block_on(c.node_get_info(NodeGetInfoRequest {}))
            .map(tonic::Response::into_inner)
    }

    pub fn node_capabilities(&mut self) -> Result<usize, Status> {
        let c = &mut self.node;
        self.rt
            .block_on(c.node_get_capabilities(NodeGetCapabilitiesRequest {}))
            .map(|r| r.into_inner().capabilities.len())
    }

    pub fn publish(&mut self, req: NodePublishVolumeRequest) -> Result<(), Status> {
        let c = &mut self.node;
        self.rt.block_on(c.node_publish_volume(req)).map(drop)
    }

    pub fn unpublish(&mut self, volume_id: &str, target_path: &Path) -> Result<(), Status> {
        let c = &mut self.node;
        let req = NodeUnpublishVolumeRequest {
            volume_id: volume_id.to_owned(),
            target_path: target_path.display().to_string(),
        };
        self.rt.block_on(c.node_unpublish_volume(req)).map(drop)
    }
}

/// A publish request for an ephemeral inline volume of pod
/// `namespace/pod` (uid `uid`), as kubelet sends it, with volume attributes `attrs`.
pub fn ephemeral_publish(
    volume_id: &str,
    target_path: &Path,
    namespace: &str,
    pod: &str,
    uid: &str,
    attrs: &[(&str, &str)],
) -> NodePublishVolumeRequest {
    use crate::{
        csi::{
            VolumeCapability,
            volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode},
        },
        request::{CTX_EPHEMERAL, CTX_POD_NAME, CTX_POD_NAMESPACE, CTX_POD_UID},
    };
    let mut ctx: std::collections::HashMap<String, String> = attrs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    for (k, v) in [
        (CTX_POD_NAME, pod),
        (CTX_POD_NAMESPACE, namespace),
        (CTX_POD_UID, uid),
        (CTX_EPHEMERAL, "true"),
    ] {
        ctx.entry(k.to_owned()).or_insert_with(|| v.to_owned());
    }
    NodePublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        target_path: target_path.display().to_string(),
        volume_capability: Some(VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(AccessType::Mount(MountVolume::default())),
        }),
        volume_context: ctx,
        ..NodePublishVolumeRequest::default()
    }
}
