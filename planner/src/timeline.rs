//! `--svg`: a per-machine timeline of the predicted schedule, one panel per phase, ops
//! coloured by kind and link transfers drawn between lanes.

use std::fmt::Write;

use lemur_protocol::OpKind;

use crate::planning::Planned;

fn colour(kind: OpKind) -> &'static str {
    match kind {
        OpKind::Embedding | OpKind::LmHead => "#7f7f7f",
        OpKind::AttnNorm | OpKind::MlpNorm | OpKind::FinalNorm => "#bcbd22",
        OpKind::QProj | OpKind::KProj | OpKind::VProj | OpKind::OProj => "#1f77b4",
        OpKind::Rope => "#17becf",
        OpKind::Attention => "#d62728",
        OpKind::AttnResidual | OpKind::MlpResidual => "#9467bd",
        OpKind::GateProj | OpKind::UpProj | OpKind::DownProj => "#2ca02c",
        OpKind::SiluMul => "#ff7f0e",
    }
}

/// One op's place in the schedule.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub machine: usize,
    pub start_s: f64,
    pub end_s: f64,
}

/// List-schedules one run of phase `p` in op order: an op starts when its machine is free
/// and every input has arrived (producer's end plus the link time when it crosses).
pub fn schedule(planned: &Planned, p: usize) -> Vec<Slot> {
    let inst = &planned.instance;
    let a = &planned.assignment;
    let ph = &inst.phases[p];
    let mut free = vec![0.0; inst.num_machines()];
    let mut slots: Vec<Slot> = Vec::with_capacity(ph.graph.len());
    for (id, _) in ph.graph.ops() {
        let m = a.machine_of(inst, p, id);
        let mut ready: f64 = free[m];
        for e in ph.graph.edges().filter(|e| e.1 == id) {
            let src = slots[e.0];
            let arrive =
                if src.machine == m { src.end_s } else { src.end_s + inst.transfer_s(src.machine, m, e.2.bytes) };
            ready = ready.max(arrive);
        }
        let end = ready + ph.costs.at(id, m);
        free[m] = end;
        slots.push(Slot { machine: m, start_s: ready, end_s: end });
    }
    slots
}

/// The SVG document.
pub fn svg(planned: &Planned) -> String {
    let inst = &planned.instance;
    let k = inst.num_machines();
    let (width, lane, label_w) = (1400.0, 28.0, 110.0);
    let panel_h = 40.0 + lane * k as f64 + 30.0;
    let height = panel_h * inst.phases.len() as f64 + 60.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (p, ph) in inst.phases.iter().enumerate() {
        let slots = schedule(planned, p);
        let total = slots.iter().map(|s| s.end_s).fold(0.0, f64::max).max(1e-12);
        let y0 = p as f64 * panel_h + 20.0;
        let scale = (width - label_w - 20.0) / total;
        let _ = writeln!(
            s,
            r#"<text x="10" y="{}" font-weight="bold">{} of {}: {:.2} ms, one run in order</text>"#,
            y0 + 12.0,
            ph.phase_name,
            planned.plan.model.name,
            total * 1e3
        );
        for (m, mc) in inst.machines.iter().enumerate() {
            let y = y0 + 24.0 + lane * m as f64;
            let _ = writeln!(s, r#"<text x="10" y="{}">{}</text>"#, y + lane * 0.6, mc.name);
            let _ = writeln!(s, r##"<line x1="{label_w}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##, width - 20.0);
        }
        for (id, slot) in slots.iter().enumerate() {
            let op = ph.graph.op(id);
            let x = label_w + slot.start_s * scale;
            let w = ((slot.end_s - slot.start_s) * scale).max(0.5);
            let y = y0 + 24.0 + lane * slot.machine as f64 + 3.0;
            let _ = writeln!(
                s,
                r#"<rect x="{x:.2}" y="{y:.2}" width="{w:.2}" height="{:.1}" fill="{}"><title>{} {:.3} ms</title></rect>"#,
                lane - 6.0,
                colour(op.kind),
                op.label(),
                (slot.end_s - slot.start_s) * 1e3
            );
        }
        for (from, to, _) in ph.graph.edges() {
            let (a, b) = (slots[from], slots[to]);
            if a.machine != b.machine {
                let ya = y0 + 24.0 + lane * a.machine as f64 + lane / 2.0;
                let yb = y0 + 24.0 + lane * b.machine as f64 + lane / 2.0;
                let _ = writeln!(
                    s,
                    r##"<line x1="{:.2}" y1="{ya:.1}" x2="{:.2}" y2="{yb:.1}" stroke="#333" stroke-width="1" opacity="0.6"/>"##,
                    label_w + a.end_s * scale,
                    label_w + b.start_s * scale
                );
            }
        }
    }
    let legend = [
        ("projections", OpKind::QProj),
        ("MLP", OpKind::GateProj),
        ("attention", OpKind::Attention),
        ("RoPE", OpKind::Rope),
        ("norms", OpKind::AttnNorm),
        ("SiLU-mul", OpKind::SiluMul),
        ("residual", OpKind::AttnResidual),
        ("embedding/head", OpKind::LmHead),
    ];
    let y = height - 25.0;
    for (i, (name, kind)) in legend.iter().enumerate() {
        let x = 10.0 + i as f64 * 130.0;
        let _ = writeln!(s, r#"<rect x="{x}" y="{y}" width="12" height="12" fill="{}"/>"#, colour(*kind));
        let _ = writeln!(s, r#"<text x="{}" y="{}">{name}</text>"#, x + 16.0, y + 10.0);
    }
    let _ = writeln!(s, r#"<text x="1150" y="{}">lines: tensors crossing a link</text>"#, y + 10.0);
    s.push_str("</svg>\n");
    s
}
