//! Detection rules: which CNI a node runs, from config files, state files and interfaces.

mod common;

use cni_adapters::{detect, parse_force, Cni, NodeView};
use common::*;

fn has(ev: &[String], needle: &str) -> bool {
    ev.iter().any(|l| l.contains(needle))
}

#[test]
fn calico_nodes_are_calico_by_config() {
    for view in [calico_ipip(), calico_vxlan()] {
        let d = detect(&view, None);
        assert_eq!(
            (d.cni, d.confidence),
            (Cni::Calico, "config"),
            "{:?}",
            d.evidence
        );
        assert!(
            has(&d.evidence, "10-calico.conflist (in use)"),
            "{:?}",
            d.evidence
        );
        assert!(
            has(&d.evidence, "calico, calico-ipam, bandwidth, portmap"),
            "{:?}",
            d.evidence
        );
        assert!(has(&d.evidence, "state file /var/run/calico -> calico"));
        assert!(has(&d.evidence, "interfaces suggest calico: "));
        assert!(has(&d.evidence, "cali1a2b3c4d5e6"));
    }
    // The kubeconfig beside the config is not a CNI config; the idle tunl0 is no evidence.
    let d = detect(&calico_ipip(), None);
    assert!(
        has(&d.evidence, "calico-kubeconfig ignored"),
        "{:?}",
        d.evidence
    );
    assert!(!has(&d.evidence, "tunl0"), "{:?}", d.evidence);
}

#[test]
fn cilium_node_is_cilium_and_ignores_the_renamed_config() {
    let d = detect(&cilium(), None);
    assert_eq!(
        (d.cni, d.confidence),
        (Cni::Cilium, "config"),
        "{:?}",
        d.evidence
    );
    assert!(
        has(&d.evidence, "10-calico.conflist.cilium_bak ignored"),
        "{:?}",
        d.evidence
    );
    assert!(has(
        &d.evidence,
        "interfaces suggest cilium: cilium_net, cilium_host, cilium_vxlan, lxc_health, lxc12345"
    ));
    assert!(
        !has(&d.evidence, "but"),
        "no source disagrees: {:?}",
        d.evidence
    );
}

#[test]
fn flannel_node_is_flannel_through_its_delegate() {
    let d = detect(&flannel(), None);
    assert_eq!((d.cni, d.confidence), (Cni::Flannel, "config"));
    assert!(has(
        &d.evidence,
        "state file /run/flannel/subnet.env -> flannel"
    ));
    assert!(has(&d.evidence, "interfaces suggest flannel: flannel.1"));
}

#[test]
fn bridge_config_is_generic_by_config() {
    let d = detect(&generic(), None);
    assert_eq!(
        (d.cni, d.confidence),
        (Cni::Generic, "config"),
        "{:?}",
        d.evidence
    );
    assert!(
        has(&d.evidence, "[bridge, host-local, portmap] -> generic"),
        "{:?}",
        d.evidence
    );
}

#[test]
fn config_wins_over_interfaces_and_evidence_lists_both() {
    let mut view = calico_ipip();
    view.cni_configs = vec![("10-flannel.conflist".into(), FLANNEL_CONFLIST.into())];
    view.files_present.clear();
    let d = detect(&view, None);
    assert_eq!((d.cni, d.confidence), (Cni::Flannel, "config"));
    assert!(has(
        &d.evidence,
        "10-flannel.conflist (in use): plugin types [flannel, portmap] -> flannel"
    ));
    assert!(has(&d.evidence, "interfaces suggest calico"));
    assert!(
        has(
            &d.evidence,
            "interfaces say calico, but flannel was chosen (config)"
        ),
        "{:?}",
        d.evidence
    );
}

#[test]
fn forced_adapter_wins_and_keeps_what_was_seen() {
    let d = detect(&calico_ipip(), Some(Cni::Generic));
    assert_eq!((d.cni, d.confidence), (Cni::Generic, "forced"));
    assert_eq!(d.evidence[0], "forced by configuration: generic");
    assert!(
        has(
            &d.evidence,
            "the CNI config says calico, but generic was chosen (forced)"
        ),
        "{:?}",
        d.evidence
    );
    let d = detect(&NodeView::default(), Some(Cni::Cilium));
    assert_eq!((d.cni, d.confidence), (Cni::Cilium, "forced"));
}

#[test]
fn empty_node_falls_back_to_generic() {
    let d = detect(&NodeView::default(), None);
    assert_eq!((d.cni, d.confidence), (Cni::Generic, "fallback"));
    assert!(
        has(&d.evidence, "nothing") || has(&d.evidence, "no CNI config"),
        "{:?}",
        d.evidence
    );
}

#[test]
fn interfaces_decide_without_config_or_state() {
    for (mut view, want) in [
        (calico_ipip(), Cni::Calico),
        (cilium(), Cni::Cilium),
        (flannel(), Cni::Flannel),
    ] {
        view.cni_configs.clear();
        view.files_present.clear();
        let d = detect(&view, None);
        assert_eq!(
            (d.cni, d.confidence),
            (want, "interfaces"),
            "{:?}",
            d.evidence
        );
    }
    // A generic node's interfaces name no CNI.
    let mut view = generic();
    view.cni_configs.clear();
    assert_eq!(detect(&view, None).confidence, "fallback");
}

#[test]
fn state_files_decide_without_config_and_canal_is_calico() {
    let mut view = flannel();
    view.cni_configs.clear();
    // Canal: Calico's state dir beside Flannel's subnet.env; /var/run and /run are the same.
    view.files_present = vec!["/run/flannel/subnet.env".into(), "/run/calico/".into()];
    let d = detect(&view, None);
    assert_eq!(
        (d.cni, d.confidence),
        (Cni::Calico, "config"),
        "{:?}",
        d.evidence
    );
    assert!(has(
        &d.evidence,
        "interfaces say flannel, but calico was chosen"
    ));
    view.files_present = vec!["/var/run/cilium".into()];
    assert_eq!(detect(&view, None).cni, Cni::Cilium);
    view.files_present = vec!["/run/calicoctl".into(), "/etc/flannel".into()];
    assert_eq!(detect(&view, None).confidence, "interfaces");
}

#[test]
fn first_config_in_name_order_is_the_one_in_use() {
    let view = node(
        vec![],
        &[
            ("10-calico.conflist", CALICO_CONFLIST),
            ("05-cilium.conflist", CILIUM_CONFLIST),
        ],
        &[],
    );
    let d = detect(&view, None);
    assert_eq!(d.cni, Cni::Cilium);
    assert!(
        has(&d.evidence, "10-calico.conflist (not in use"),
        "{:?}",
        d.evidence
    );
}

#[test]
fn broken_config_is_skipped_for_the_next_one() {
    let view = node(
        vec![],
        &[
            ("00-broken.conf", "{ not json"),
            ("01-empty.conf", r#"{"name": "x"}"#),
            ("10-flannel.conflist", FLANNEL_CONFLIST),
        ],
        &[],
    );
    let d = detect(&view, None);
    assert_eq!((d.cni, d.confidence), (Cni::Flannel, "config"));
    assert!(has(&d.evidence, "00-broken.conf: skipped, not valid JSON"));
    assert!(has(
        &d.evidence,
        "01-empty.conf: skipped, neither `type` nor `plugins`"
    ));
}

#[test]
fn multus_and_chained_configs_name_the_real_cni() {
    let multus = r#"{"cniVersion": "0.3.1", "name": "multus-cni-network", "type": "multus",
        "delegates": [{"cniVersion": "0.3.1", "name": "k8s-pod-network",
                       "plugins": [{"type": "calico"}, {"type": "portmap"}]}]}"#;
    let view = node(vec![], &[("00-multus.conf", multus)], &[]);
    assert_eq!(detect(&view, None).cni, Cni::Calico);
    // Cilium chained behind another plugin owns the tc programs: Cilium.
    let chained =
        r#"{"name": "aws-cni", "plugins": [{"type": "aws-cni"}, {"type": "cilium-cni"}]}"#;
    let view = node(vec![], &[("10-aws.conflist", chained)], &[]);
    assert_eq!(detect(&view, None).cni, Cni::Cilium);
}

#[test]
fn prefix_lookalikes_are_not_cni_evidence() {
    let view = node(
        vec![
            iface("lxcbr0", 3, "bridge"),
            iface("calico-br", 4, "bridge"),
            iface("cni0", 5, "bridge"),
        ],
        &[],
        &[],
    );
    assert_eq!(detect(&view, None).confidence, "fallback");
}

#[test]
fn many_interfaces_are_summarised() {
    let ifaces = (0..12)
        .map(|n| pod_veth(&format!("cali{n:011}"), 10 + n, n as i32))
        .collect();
    let d = detect(&node(ifaces, &[], &[]), None);
    assert!(has(&d.evidence, "(+7 more)"), "{:?}", d.evidence);
}

#[test]
fn force_values_parse() {
    assert_eq!(parse_force("auto"), Ok(None));
    assert_eq!(parse_force(""), Ok(None));
    assert_eq!(parse_force(" Cilium "), Ok(Some(Cni::Cilium)));
    assert_eq!(parse_force("generic"), Ok(Some(Cni::Generic)));
    let err = parse_force("weave").unwrap_err().to_string();
    assert!(err.contains("weave") && err.contains("calico"), "{err}");
    assert_eq!("flannel".parse::<Cni>(), Ok(Cni::Flannel));
    assert_eq!(Cni::Calico.to_string(), "calico");
}

#[test]
fn cni_and_detection_serialize_in_lowercase() {
    assert_eq!(serde_json::to_string(&Cni::Cilium).unwrap(), r#""cilium""#);
    assert_eq!(
        serde_json::from_str::<Cni>(r#""flannel""#).unwrap(),
        Cni::Flannel
    );
    let d = detect(&flannel(), None);
    let v = serde_json::to_value(&d).unwrap();
    assert_eq!(v["cni"], "flannel");
    assert_eq!(v["confidence"], "config");
    // A NodeView round-trips, so fixtures can be captured from a real node as JSON.
    let view = cilium();
    let back: NodeView = serde_json::from_str(&serde_json::to_string(&view).unwrap()).unwrap();
    assert_eq!(back, view);
}
