//! The CSI Identity and Node services. Each RPC validates its arguments
//! first (no side effect on a bad request), takes the volume's in-flight
//! slot (a second call on the same volume gets ABORTED), then runs the
//! blocking work (membership HTTP call, mount syscalls) off the runtime.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, PoisonError},
};

use tonic::{Request, Response, Status};

use crate::{
    csi::{
        self, GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
        GetPluginInfoResponse, NodeExpandVolumeRequest, NodeExpandVolumeResponse,
        NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse, NodeGetInfoRequest,
        NodeGetInfoResponse, NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse,
        NodePublishVolumeRequest, NodePublishVolumeResponse, NodeStageVolumeRequest,
        NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
        NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, ProbeRequest, ProbeResponse,
    },
    error::Error,
    membership::Membership,
    regions::Regions,
    request::{self, Limits, Medium},
    size, sys,
};

/// The CSI driver name.
pub const DRIVER_NAME: &str = "shm.spright.dev";

/// Everything the services share.
pub struct Plugin {
    pub node_id: String,
    pub limits: Limits,
    pub membership: Membership,
    pub regions: Regions,
    in_flight: Mutex<HashSet<String>>,
}

/// Holds a volume's in-flight slot; released on drop (also on panic).
struct InFlight {
    plugin: Arc<Plugin>,
    volume_id: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.plugin
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.volume_id);
    }
}

impl Plugin {
    pub fn new(node_id: String, limits: Limits, membership: Membership, regions: Regions) -> Self {
        Self {
            node_id,
            limits,
            membership,
            regions,
            in_flight: Mutex::new(HashSet::new()),
        }
    }

    fn begin(self: &Arc<Self>, volume_id: &str) -> Result<InFlight, Error> {
        let mut set = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !set.insert(volume_id.to_owned()) {
            return Err(Error::InFlight(volume_id.to_owned()));
        }
        Ok(InFlight {
            plugin: Arc::clone(self),
            volume_id: volume_id.to_owned(),
        })
    }
}

/// Runs blocking work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Status::from),
        Err(e) => Err(Status::internal(format!("request task failed: {e}"))),
    }
}

#[derive(Clone)]
pub struct Identity;

#[tonic::async_trait]
impl csi::identity_server::Identity for Identity {
    /// "The name MUST follow domain name notation format … It MUST be 63
    /// characters or less, beginning and ending with an alphanumeric
    /// character … This field is REQUIRED." `vendor_version`: "This field is
    /// REQUIRED."
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: std::collections::HashMap::default(),
        }))
    }

    /// "All instances of the same version (see vendor_version of
    /// GetPluginInfoResponse) of the Plugin SHALL return the same set of
    /// capabilities". A node-only plugin: no CONTROLLER_SERVICE, no
    /// topology constraints.
    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    /// "1) The plugin is in an unhealthy state and MAY need restarting. In
    /// this case a gRPC error code SHALL be returned." The plugin is ready
    /// once it serves (regions were reconciled before the socket opened).
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

#[derive(Clone)]
pub struct Node(pub Arc<Plugin>);

#[tonic::async_trait]
impl csi::node_server::Node for Node {
    /// Not offered (no STAGE_UNSTAGE_VOLUME capability).
    async fn node_stage_volume(
        &self,
        _: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented("shm.spright.dev has no staging"))
    }

    /// Not offered (no STAGE_UNSTAGE_VOLUME capability).
    async fn node_unstage_volume(
        &self,
        _: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented("shm.spright.dev has no staging"))
    }

    /// "The path to which the volume will be published. It MUST be an
    /// absolute path … Creation of target_path is the responsibility of the
    /// SP. This is a REQUIRED field." "Volume capability … SP MUST ensure the
    /// CO can use the published volume as described. Otherwise SP MUST return
    /// the appropriate gRPC error code. This is a REQUIRED field."
    /// "Indicates SP MUST publish the volume in readonly mode."
    ///
    /// Idempotent: the same arguments again succeed; the same volume with
    /// other arguments is ALREADY_EXISTS; a call while another one on the
    /// volume runs is ABORTED; a pod outside the chain is PERMISSION_DENIED.
    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let p = request::publish(req.get_ref(), self.0.limits)?;
        let guard = self.0.begin(&p.volume_id)?;
        let plugin = Arc::clone(&self.0);
        tracing::info!(volume.id = %p.volume_id, pod.namespace = %p.namespace, pod.name = %p.pod_name,
            chain = %p.chain, size = p.size, medium = p.medium.as_str(), target = %p.target_path.display(), "publish");
        let result = blocking(move || {
            let _guard = guard;
            if p.medium == Medium::Hugepages {
                let page = sys::hugepages_available().map_err(Error::NoHugepages)?;
                if !p.size.is_multiple_of(page) {
                    return Err(Error::invalid(
                        "size",
                        &size::format(p.size),
                        format!(
                            "must be a multiple of the huge page size {}",
                            size::format(page)
                        ),
                    ));
                }
            }
            plugin
                .membership
                .check(&spright_endpoint::membership::Query {
                    namespace: p.namespace.clone(),
                    pod: p.pod_name.clone(),
                    uid: p.pod_uid.clone(),
                    chain: p.chain.clone(),
                })?;
            plugin.regions.publish(&p)
        })
        .await;
        if let Err(s) = &result {
            tracing::warn!(code = ?s.code(), error = s.message(), "publish failed");
        }
        result.map(|()| Response::new(NodePublishVolumeResponse {}))
    }

    /// "The ID of the volume. This field is REQUIRED." "The path at which the
    /// volume was published. It MUST be an absolute path … The SP MUST delete
    /// the file or directory it created at this path. This is a REQUIRED
    /// field." Unpublishing an unknown or already unmounted path succeeds;
    /// the region is freed when its last user leaves.
    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let (volume_id, target) = request::unpublish(req.get_ref())?;
        let guard = self.0.begin(&volume_id)?;
        let plugin = Arc::clone(&self.0);
        tracing::info!(volume.id = %volume_id, target = %target.display(), "unpublish");
        let result = blocking(move || {
            let _guard = guard;
            plugin.regions.unpublish(&volume_id, &target)
        })
        .await;
        if let Err(s) = &result {
            tracing::warn!(code = ?s.code(), error = s.message(), "unpublish failed");
        }
        result.map(|()| Response::new(NodeUnpublishVolumeResponse {}))
    }

    /// Not offered (no GET_VOLUME_STATS capability).
    async fn node_get_volume_stats(
        &self,
        _: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        Err(Status::unimplemented("volume stats are not offered"))
    }

    /// Not offered (no EXPAND_VOLUME capability).
    async fn node_expand_volume(
        &self,
        _: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented("volume expansion is not offered"))
    }

    /// No node capabilities: publish/unpublish only.
    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    /// "This field MUST contain enough information to uniquely identify this
    /// specific node vs all other nodes supported by this plugin."
    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.0.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}
