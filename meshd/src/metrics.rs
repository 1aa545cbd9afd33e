//! Prometheus metrics, derived at scrape time from the same node view as
//! `/status` (so both always agree).

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::{status::Status, view::Reader};

/// Registers the node's collector.
pub fn registry(reader: Reader) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(NodeCollector(reader)));
    r
}

/// Text exposition of the registry.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

#[derive(Debug)]
struct NodeCollector(Reader);

type Labels = Vec<(&'static str, String)>;

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let status = self.0.status();
        encode_status(&status, &mut enc)
    }
}

fn encode_status(s: &Status, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
    gauge(
        enc,
        "spright_acceleration_enabled",
        "1 when the eBPF datapath is installed and in use, 0 when off (see /status for why)",
        &[(vec![], i64::from(s.acceleration.enabled))],
    )?;
    if let Some(t) = &s.selftest {
        gauge(
            enc,
            "spright_kernel_blocking_recv_eagain",
            "Start-up self-test: 1 when this kernel's redirect path makes a blocking recv() return EAGAIN, 0 when not, -1 unknown or disabled",
            &[(vec![], t.gauge())],
        )?;
    }
    gauge(
        enc,
        "spright_malformed_records",
        "Endpoint records skipped because they could not be read",
        &[(
            vec![],
            i64::try_from(s.malformed_records.len()).unwrap_or(i64::MAX),
        )],
    )?;
    counter(
        enc,
        "spright_reconciles",
        "Reconciliations of the maps from the endpoint records",
        &[(vec![], s.reconciles)],
    )?;
    if let Some(m) = &s.memory_bound {
        gauge(
            enc,
            "spright_memory_bound_limit_bytes",
            "Receive memory one redirected connection may queue before its sender is moved to TCP (0: bound off)",
            &[(vec![], i64::try_from(m.limit_bytes).unwrap_or(i64::MAX))],
        )?;
        counter(
            enc,
            "spright_memory_bound_switches",
            "Connection directions moved from the redirect path to TCP because the receiver stopped reading",
            &[(vec![], m.switches)],
        )?;
    }
    let chain_labels = |ns: &str, chain: &str| -> Labels {
        vec![("namespace", ns.to_owned()), ("chain", chain.to_owned())]
    };
    gauge(
        enc,
        "spright_chain_endpoints",
        "Local endpoints per chain",
        &s.chains
            .iter()
            .map(|c| {
                (
                    chain_labels(&c.namespace, &c.chain),
                    i64::try_from(c.endpoints).unwrap_or(i64::MAX),
                )
            })
            .collect::<Vec<_>>(),
    )?;
    let pods: Vec<(Labels, &crate::status::CounterSet)> = s
        .endpoints
        .iter()
        .filter(|e| e.chain.is_some())
        .map(|e| {
            (
                vec![
                    ("namespace", e.namespace.clone()),
                    ("chain", e.chain.clone().unwrap_or_default()),
                    ("pod", e.pod.clone()),
                    ("function", e.function.clone().unwrap_or_default()),
                ],
                &e.counters,
            )
        })
        .collect();
    let per_pod = |f: fn(&crate::status::CounterSet) -> u64| {
        pods.iter()
            .map(|(l, c)| (l.clone(), f(c)))
            .collect::<Vec<_>>()
    };
    counter(
        enc,
        "spright_redirected_messages",
        "Messages sent socket to socket (sk_msg redirect), per sending pod",
        &per_pod(|c| c.redirected_messages),
    )?;
    counter(
        enc,
        "spright_redirected_bytes",
        "Bytes sent socket to socket, per sending pod",
        &per_pod(|c| c.redirected_bytes),
    )?;
    counter(
        enc,
        "spright_fallback_messages",
        "Messages of accelerated sockets that took the TCP path (peer not yet in the map)",
        &per_pod(|c| c.fallback_messages),
    )?;
    counter(
        enc,
        "spright_fallback_bytes",
        "Bytes of accelerated sockets that took the TCP path",
        &per_pod(|c| c.fallback_bytes),
    )?;
    counter(
        enc,
        "spright_accelerated_sockets",
        "Sockets of the pod inserted into the sockhash",
        &per_pod(|c| c.accelerated_sockets),
    )?;
    encode_services(s, enc)
}

fn encode_services(s: &Status, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
    let labels = |v: &crate::services::ServiceStatus| -> Labels {
        vec![
            ("namespace", v.port.namespace.clone()),
            ("service", v.port.name.clone()),
            ("address", v.port.address.to_string()),
        ]
    };
    counter(
        enc,
        "spright_service_translations",
        "Connections to a Service port sent straight to a node-local backend at connect()",
        &s.services
            .iter()
            .map(|v| (labels(v), v.translated_connections))
            .collect::<Vec<_>>(),
    )?;
    gauge(
        enc,
        "spright_service_local_backends",
        "Ready backends of a Service port that are chain pods on this node",
        &s.services
            .iter()
            .map(|v| {
                (
                    labels(v),
                    i64::try_from(v.local_backends.len()).unwrap_or(i64::MAX),
                )
            })
            .collect::<Vec<_>>(),
    )?;
    gauge(
        enc,
        "spright_translated_connections_open",
        "Open connections whose destination was translated at connect()",
        &[(
            vec![],
            i64::try_from(s.translations.len()).unwrap_or(i64::MAX),
        )],
    )?;
    gauge(
        enc,
        "spright_malformed_service_files",
        "Service files (or objects in them) skipped because they could not be used",
        &[(
            vec![],
            i64::try_from(s.malformed_service_files.len()).unwrap_or(i64::MAX),
        )],
    )
}

fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}
