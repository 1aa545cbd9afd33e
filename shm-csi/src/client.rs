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

/// What one raw HTTP/2 call got back on its stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RawAnswer {
    /// Bytes of DATA (the gRPC message with its 5-byte prefix).
    pub data_bytes: usize,
    /// The stream ended normally (END_STREAM from the server).
    pub ended: bool,
    /// RST_STREAM's error code, if the server reset the stream.
    pub reset: Option<u32>,
}

/// Calls `Identity/Probe` twice on one connection, written frame by frame
/// the way grpcio does over a unix socket: the first request adds
/// `:authority: <authority>` to the HPACK dynamic table (Huffman-coded when
/// `huffman`), the second refers to that table entry. tonic's own client
/// cannot send an `:authority` that is not a URI authority, so this is how
/// the tests call like those clients do.
pub fn raw_probes(
    socket: &Path,
    authority: &[u8],
    huffman: bool,
) -> std::io::Result<[RawAnswer; 2]> {
    use std::io::{Read as _, Write as _};

    use crate::authority::{frame_head, huffman_encode, put_integer};

    fn string(b: &mut Vec<u8>, s: &[u8], huffman: bool) {
        if huffman {
            let h = huffman_encode(s);
            put_integer(b, 0x80, 7, h.len());
            b.extend_from_slice(&h);
        } else {
            put_integer(b, 0, 7, s.len());
            b.extend_from_slice(s);
        }
    }
    let block = |first: bool| {
        // :method POST, :scheme http (static 3 and 6, indexed).
        let mut b = vec![0x83, 0x86];
        // :path (static 4), literal without indexing.
        put_integer(&mut b, 0, 4, 4);
        string(&mut b, b"/csi.v1.Identity/Probe", false);
        if first {
            // :authority (static 1), literal with incremental indexing.
            put_integer(&mut b, 0x40, 6, 1);
            string(&mut b, authority, huffman);
        } else {
            // The dynamic table's newest entry (62).
            b.push(0x80 | 0x3e);
        }
        // content-type (static 31) and te, literals without indexing.
        put_integer(&mut b, 0, 4, 31);
        string(&mut b, b"application/grpc", false);
        b.push(0);
        string(&mut b, b"te", false);
        string(&mut b, b"trailers", false);
        b
    };
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame_head(0, 0x4, 0, &[0; 4]));
    for (i, stream) in [1u32, 3].into_iter().enumerate() {
        let id = stream.to_be_bytes();
        let b = block(i == 0);
        out.extend(frame_head(b.len(), 0x1, 0x4, &id));
        out.extend(b);
        // An empty ProbeRequest: uncompressed, length 0; END_STREAM.
        out.extend(frame_head(5, 0x0, 0x1, &id));
        out.extend([0u8; 5]);
    }
    let mut c = std::os::unix::net::UnixStream::connect(socket)?;
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    c.write_all(&out)?;
    let mut answers: [RawAnswer; 2] = Default::default();
    let done = |a: &[RawAnswer; 2]| a.iter().all(|a| a.ended || a.reset.is_some());
    // Bounded: at most 64 frames, each read with a timeout.
    for _ in 0..64 {
        if done(&answers) {
            break;
        }
        let mut head = [0u8; 9];
        c.read_exact(&mut head)?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        c.read_exact(&mut payload)?;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if kind == 0x4 && flags & 0x1 == 0 {
            c.write_all(&frame_head(0, 0x4, 0x1, &[0; 4]))?;
        }
        if kind == 0x7 {
            return Err(std::io::Error::other(format!(
                "GOAWAY from the server: {payload:02x?}"
            )));
        }
        let Some(a) = (match stream {
            1 => Some(&mut answers[0]),
            3 => Some(&mut answers[1]),
            _ => None,
        }) else {
            continue;
        };
        match kind {
            0x0 => a.data_bytes += len,
            0x3 => {
                a.reset = payload
                    .get(..4)
                    .map(|p| u32::from_be_bytes([p[0], p[1], p[2], p[3]]));
            }
            _ => {}
        }
        if matches!(kind, 0x0 | 0x1) && flags & 0x1 != 0 {
            a.ended = true;
        }
    }
    Ok(answers)
}
