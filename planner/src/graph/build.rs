//! How an [`OpGraph`](super::OpGraph) is built: the forward pass (prefill, decode or
//! training's forward) op by op with its kernels and edges, then training's backward ops in
//! reverse with gradient and saved-tensor edges and each forward op's training memory.

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use lemur_protocol::{DType, ModelConfig, OpKind, Phase, WeightFormat};

use super::*;

/// The graph under construction: the model, the precision, and the ops added so far.
pub(super) struct Builder<'a> {
    pub(super) m: &'a ModelConfig,
    pub(super) dt: DType,
    pub(super) wf: WeightFormat,
    pub(super) g: DiGraph<Op, Edge>,
}

/// Ids of the forward ops, for wiring the backward pass.
pub(super) struct Forward {
    ids: Vec<NodeIndex>,
}

impl Builder<'_> {
    fn act(&self, tokens: u64, width: u64) -> u64 {
        tokens * width * self.dt.bytes()
    }

    fn ew(&self, class: EwClass, read: u64, write: u64) -> Kernel {
        Kernel::Elementwise { class, backward: false, read_bytes: read, write_bytes: write }
    }

    fn add(&mut self, op: Op) -> NodeIndex {
        self.g.add_node(op)
    }

    fn edge(&mut self, from: NodeIndex, to: NodeIndex, bytes: u64) {
        self.g.add_edge(from, to, Edge { bytes, kind: EdgeKind::Activation });
    }

    /// A linear projection of `t` tokens from `k_in` to `n_out` features, with its LoRA adapter if any.
    ///
    /// A weight in a block format runs the quantized kernels, except in training (QLoRA),
    /// where the op dequantizes it and multiplies densely, as the workers do.
    fn linear(&self, kind: OpKind, layer: Option<u32>, phase: Phase, t: u64, lora: u64) -> Op {
        let dt = self.dt;
        let (k_in, n_out) = linear_dims(self.m, kind);
        let quant = self.wf.tensor_format(kind, layer, self.m);
        let w = self.wf.tensor_bytes(kind, layer, self.m, k_in * n_out, dt);
        let mut kernels = match quant {
            Some(f) if phase == Phase::Forward => {
                let dense = k_in * n_out * dt.bytes();
                vec![
                    self.ew(EwClass::Dequantize(f), w, dense),
                    Kernel::Gemm { batch: 1, m: t, n: n_out, k: k_in, dtype: dt, weight_bytes: dense, quant: None },
                ]
            }
            _ => vec![Kernel::Gemm { batch: 1, m: t, n: n_out, k: k_in, dtype: dt, weight_bytes: w, quant }],
        };
        if lora > 0 {
            let (a, bw) = (lora * k_in * dt.bytes(), n_out * lora * dt.bytes());
            kernels.push(Kernel::Gemm { batch: 1, m: t, n: lora, k: k_in, dtype: dt, weight_bytes: a, quant: None });
            kernels.push(Kernel::Gemm { batch: 1, m: t, n: n_out, k: lora, dtype: dt, weight_bytes: bw, quant: None });
            kernels.push(self.ew(EwClass::Add, 2 * self.act(t, n_out), self.act(t, n_out)));
        }
        let mut op = Op::new(kind, layer, phase, kernels);
        op.weight_bytes = w;
        op
    }

    fn norm(&self, kind: OpKind, layer: Option<u32>, phase: Phase, t: u64) -> Op {
        let h = self.m.hidden_size;
        let k = self.ew(EwClass::RmsNorm, self.act(t, h) + h * self.dt.bytes(), self.act(t, h));
        let mut op = Op::new(kind, layer, phase, vec![k]);
        op.weight_bytes = h * self.dt.bytes();
        op
    }

    /// The forward (or prefill/decode) pass. `t_kv` is how many keys each query attends
    /// (materialised), `ctx` the KV-cache length to hold.
    pub(super) fn forward(
        &mut self,
        phase: Phase,
        b: u64,
        s: u64,
        t_kv: u64,
        ctx: u64,
        ft: Option<&Finetune>,
    ) -> Forward {
        let m = self.m;
        let dt = self.dt;
        let t = b * s; // tokens in flight
        let (h, qd, kvd, inter) = (m.hidden_size, m.q_dim(), m.kv_dim(), m.intermediate_size);
        let lora_rank = |kind: OpKind| match ft {
            Some(Finetune::Lora(spec)) if spec.targets.contains(&kind) => spec.rank,
            _ => 0,
        };
        let mut ids = Vec::new();

        let mut emb = Op::new(
            OpKind::Embedding,
            None,
            phase,
            vec![self.ew(EwClass::Gather, self.act(t, h) + t * 4, self.act(t, h))],
        );
        emb.weight_bytes = self.wf.tensor_bytes(OpKind::Embedding, None, m, m.vocab_size * h, dt);
        let emb = self.add(emb);
        ids.push(emb);
        let mut stream = emb; // producer of the residual stream

        for l in 0..m.num_layers as u32 {
            let ly = Some(l);
            let attn_norm = self.add(self.norm(OpKind::AttnNorm, ly, phase, t));
            let q = self.add(self.linear(OpKind::QProj, ly, phase, t, lora_rank(OpKind::QProj)));
            let k = self.add(self.linear(OpKind::KProj, ly, phase, t, lora_rank(OpKind::KProj)));
            let v = self.add(self.linear(OpKind::VProj, ly, phase, t, lora_rank(OpKind::VProj)));
            let rope_bytes = self.act(t, qd + kvd);
            let rope = self.add(Op::new(
                OpKind::Rope,
                ly,
                phase,
                vec![self.ew(EwClass::Rope, rope_bytes + 2 * s * m.head_dim * dt.bytes(), rope_bytes)],
            ));
            // Attention: the materialised-score kernel. Each KV head's group of query heads
            // is folded into the rows of one product, so K and V are read once, not copied
            // per query head.
            let kv_read = 2 * b * t_kv * kvd * dt.bytes();
            let att_kernels = vec![Kernel::Attention {
                bh: b * m.num_heads,
                q_len: s,
                kv_len: t_kv,
                head_dim: m.head_dim,
                gemms: 2,
                dtype: dt,
                read_bytes: self.act(t, qd) + kv_read,
            }];
            let mut att = Op::new(OpKind::Attention, ly, phase, att_kernels);
            // A cache that drops what falls out of the sliding window holds at most a window.
            let held = m.sliding_window.map_or(ctx, |w| ctx.min(w));
            att.kv_cache_bytes = 2 * b * held * kvd * dt.bytes();
            let att = self.add(att);
            let o = self.add(self.linear(OpKind::OProj, ly, phase, t, lora_rank(OpKind::OProj)));
            let res1 = self.add(Op::new(
                OpKind::AttnResidual,
                ly,
                phase,
                vec![self.ew(EwClass::Add, 2 * self.act(t, h), self.act(t, h))],
            ));
            let mlp_norm = self.add(self.norm(OpKind::MlpNorm, ly, phase, t));
            let gate = self.add(self.linear(OpKind::GateProj, ly, phase, t, lora_rank(OpKind::GateProj)));
            let up = self.add(self.linear(OpKind::UpProj, ly, phase, t, lora_rank(OpKind::UpProj)));
            let act = self.add(Op::new(
                OpKind::SiluMul,
                ly,
                phase,
                vec![self.ew(EwClass::SiluMul, 2 * self.act(t, inter), self.act(t, inter))],
            ));
            let down = self.add(self.linear(OpKind::DownProj, ly, phase, t, lora_rank(OpKind::DownProj)));
            let res2 = self.add(Op::new(
                OpKind::MlpResidual,
                ly,
                phase,
                vec![self.ew(EwClass::Add, 2 * self.act(t, h), self.act(t, h))],
            ));

            let hb = self.act(t, h);
            self.edge(stream, attn_norm, hb);
            self.edge(stream, res1, hb);
            for p in [q, k, v] {
                self.edge(attn_norm, p, hb);
            }
            self.edge(q, rope, self.act(t, qd));
            self.edge(k, rope, self.act(t, kvd));
            self.edge(rope, att, self.act(t, qd + kvd));
            self.edge(v, att, self.act(t, kvd));
            self.edge(att, o, self.act(t, qd));
            self.edge(o, res1, hb);
            self.edge(res1, mlp_norm, hb);
            self.edge(res1, res2, hb);
            self.edge(mlp_norm, gate, hb);
            self.edge(mlp_norm, up, hb);
            self.edge(gate, act, self.act(t, inter));
            self.edge(up, act, self.act(t, inter));
            self.edge(act, down, self.act(t, inter));
            self.edge(down, res2, hb);
            ids.extend([attn_norm, q, k, v, rope, att, o, res1, mlp_norm, gate, up, act, down, res2]);
            stream = res2;
        }

        let fnorm = self.add(self.norm(OpKind::FinalNorm, None, phase, t));
        // Generation needs logits of the last position only; training needs every position
        // and a cross-entropy loss over them.
        let head_rows = if ft.is_some() { t } else { b };
        // With tied embeddings the weight is the embedding's (in the head's format, as
        // llama.cpp stores it); it is still resident where the head runs.
        let mut head = self.linear(OpKind::LmHead, None, phase, head_rows, lora_rank(OpKind::LmHead));
        if ft.is_some() {
            let logits = head_rows * m.vocab_size;
            head.push_kernels(vec![self.ew(EwClass::CrossEntropy, logits * dt.bytes() + t * 4, logits * 4)]);
        }
        let head = self.add(head);
        self.edge(stream, fnorm, self.act(t, h));
        self.edge(fnorm, head, self.act(head_rows, h));
        ids.extend([fnorm, head]);
        Forward { ids }
    }

    /// Adds backward ops in reverse order, gradient edges mirroring the activation edges,
    /// saved-tensor edges, and the training memory of every forward op.
    pub(super) fn backward(&mut self, fwd: &Forward, b: u64, s: u64, ft: &Finetune) {
        let m = self.m;
        let dt = self.dt;
        let t = b * s;
        let lora = match ft {
            Finetune::Lora(spec) => Some(spec),
            Finetune::Full => None,
        };
        let lora_rank = |kind: OpKind| lora.filter(|l| l.targets.contains(&kind)).map_or(0, |l| l.rank);
        let trainable = |op: &Op| match lora {
            None => op.weight_bytes > 0,
            Some(_) => lora_rank(op.kind) > 0,
        };

        // needs_grad[i]: the op's output needs a gradient (it, or something before it, trains).
        let n = fwd.ids.len();
        let mut needs_grad = vec![false; n];
        // The forward pass is built first, so a forward op's id is its position.
        debug_assert!(fwd.ids.iter().enumerate().all(|(i, id)| id.index() == i));
        let pos = |ix: NodeIndex| ix.index();
        for (i, &id) in fwd.ids.iter().enumerate() {
            let preds: Vec<_> = self.g.neighbors_directed(id, Direction::Incoming).collect();
            needs_grad[i] = trainable(&self.g[id]) || preds.iter().any(|&p| needs_grad[pos(p)]);
        }
        // input_grad[i]: the op must produce gradients for its inputs.
        let input_grad: Vec<bool> = fwd
            .ids
            .iter()
            .map(|&id| self.g.neighbors_directed(id, Direction::Incoming).any(|p| needs_grad[pos(p)]))
            .collect();

        let mut bwd: Vec<Option<NodeIndex>> = vec![None; n];
        for i in (0..n).rev() {
            let id = fwd.ids[i];
            let f = self.g[id].clone();
            let train = trainable(&f);
            if !(train || input_grad[i]) || !needs_grad[i] {
                continue;
            }
            let (kernels, saved) = self.backward_kernels(&f, t, s, b, train, input_grad[i], lora_rank(f.kind));
            let mut op = Op::new(f.kind, f.layer, Phase::Backward, kernels);
            op.forward_of = Some(id.index());
            let bid = self.add(op);
            bwd[i] = Some(bid);
            let fw = &mut self.g[id];
            fw.saved_bytes = saved;
            fw.optimizer_bytes = match lora {
                None if train => fw.weight_bytes / dt.bytes() * full_ft_state_bytes(dt),
                Some(_) if train => {
                    let (k_in, n_out) = linear_dims(m, f.kind);
                    lora_rank(f.kind) * (k_in + n_out) * LORA_STATE_BYTES
                }
                _ => 0,
            };
            self.g.add_edge(id, bid, Edge { bytes: saved, kind: EdgeKind::Saved });
            // Gradients arrive from the backward ops of this op's consumers.
            let consumers: Vec<_> =
                self.g.edges_directed(id, Direction::Outgoing).map(|e| (e.target(), *e.weight())).collect();
            for (c, e) in consumers {
                if e.kind != EdgeKind::Activation {
                    continue;
                }
                if let Some(cb) = bwd[pos(c)] {
                    self.g.add_edge(cb, bid, Edge { bytes: e.bytes, kind: EdgeKind::Gradient });
                }
            }
        }
    }

    /// Kernels of one backward op and the bytes its forward op must save for it.
    #[allow(clippy::too_many_arguments)]
    fn backward_kernels(
        &self,
        f: &Op,
        t: u64,
        s: u64,
        b: u64,
        train: bool,
        input_grad: bool,
        lora: u64,
    ) -> (Vec<Kernel>, u64) {
        let m = self.m;
        let dt = self.dt;
        let bw =
            |class, read, write| Kernel::Elementwise { class, backward: true, read_bytes: read, write_bytes: write };
        let h = m.hidden_size;
        match f.kind {
            k if k.is_linear() => {
                let (k_in, n_out) = linear_dims(m, k);
                let rows = t; // training computes every position
                let w = k_in * n_out * dt.bytes();
                let mut ks = Vec::new();
                if k == OpKind::LmHead {
                    // Gradient of the cross-entropy: softmax minus one-hot, over the saved logits.
                    let logits = rows * m.vocab_size;
                    ks.push(bw(EwClass::CrossEntropy, logits * 4, logits * dt.bytes()));
                }
                if input_grad {
                    // A quantized base weight is dequantized again for the input gradient.
                    if let Some(q) = self.wf.tensor_format(k, f.layer, m) {
                        let stored = self.wf.tensor_bytes(k, f.layer, m, k_in * n_out, dt);
                        ks.push(Kernel::Elementwise {
                            class: EwClass::Dequantize(q),
                            backward: true,
                            read_bytes: stored,
                            write_bytes: w,
                        });
                    }
                    ks.push(Kernel::Gemm {
                        batch: 1,
                        m: rows,
                        n: k_in,
                        k: n_out,
                        dtype: dt,
                        weight_bytes: w,
                        quant: None,
                    });
                }
                let mut saved = 0;
                if train && lora == 0 {
                    // dW = X^T dY over all tokens.
                    ks.push(Kernel::Gemm {
                        batch: 1,
                        m: k_in,
                        n: n_out,
                        k: rows,
                        dtype: dt,
                        weight_bytes: 0,
                        quant: None,
                    });
                    saved += self.act(rows, k_in);
                }
                if lora > 0 {
                    // dB = (XA)^T dY; d(XA) = dY B^T; dA = X^T d(XA); dX += d(XA) A^T.
                    ks.push(Kernel::Gemm {
                        batch: 1,
                        m: lora,
                        n: n_out,
                        k: rows,
                        dtype: dt,
                        weight_bytes: 0,
                        quant: None,
                    });
                    ks.push(Kernel::Gemm {
                        batch: 1,
                        m: rows,
                        n: lora,
                        k: n_out,
                        dtype: dt,
                        weight_bytes: n_out * lora * dt.bytes(),
                        quant: None,
                    });
                    ks.push(Kernel::Gemm {
                        batch: 1,
                        m: k_in,
                        n: lora,
                        k: rows,
                        dtype: dt,
                        weight_bytes: 0,
                        quant: None,
                    });
                    if input_grad {
                        ks.push(Kernel::Gemm {
                            batch: 1,
                            m: rows,
                            n: k_in,
                            k: lora,
                            dtype: dt,
                            weight_bytes: lora * k_in * dt.bytes(),
                            quant: None,
                        });
                    }
                    saved += self.act(rows, k_in) + self.act(rows, lora);
                }
                if k == OpKind::LmHead {
                    saved += rows * m.vocab_size * 4;
                }
                (ks, saved)
            }
            OpKind::Embedding => {
                // Scatter-add of the output gradient into the embedding's gradient rows.
                (vec![bw(EwClass::Gather, self.act(t, h) + t * 4, self.act(t, h))], t * 4)
            }
            OpKind::AttnNorm | OpKind::MlpNorm | OpKind::FinalNorm => {
                // dX needs x and 1/rms; dW reduces dY * x_hat over tokens.
                let x = self.act(t, h);
                (vec![bw(EwClass::RmsNorm, 2 * x + t * 4, x)], x + t * 4)
            }
            OpKind::Rope => {
                let bytes = self.act(t, m.q_dim() + m.kv_dim());
                (vec![bw(EwClass::Rope, bytes + 2 * s * m.head_dim * dt.bytes(), bytes)], 0)
            }
            OpKind::Attention => {
                let probs = b * m.num_heads * s * s * dt.bytes();
                let qkvo = self.act(t, 2 * m.q_dim() + 2 * m.kv_dim());
                let groups = m.num_heads / m.num_kv_heads;
                let kv = self.act(t, 2 * m.kv_dim());
                let ks = vec![
                    // dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q.
                    Kernel::Attention {
                        bh: b * m.num_heads,
                        q_len: s,
                        kv_len: s,
                        head_dim: m.head_dim,
                        gemms: 4,
                        dtype: dt,
                        read_bytes: qkvo + 2 * probs,
                    },
                    // dS = P * (dP - rowsum(dO * O)), over the materialised scores.
                    bw(EwClass::SoftmaxBackward, 2 * probs, probs),
                    // Sum the repeated heads' dK and dV back onto the KV heads.
                    bw(EwClass::RepeatKv, kv * groups, kv),
                ];
                (ks, qkvo + probs)
            }
            OpKind::AttnResidual | OpKind::MlpResidual => {
                // The gradient passes through to both inputs unchanged: one copy.
                let x = self.act(t, h);
                (vec![bw(EwClass::Add, x, x)], 0)
            }
            OpKind::SiluMul => {
                let i = self.act(t, m.intermediate_size);
                (vec![bw(EwClass::SiluMul, 3 * i, 2 * i)], 2 * i)
            }
            _ => unreachable!("every op kind is covered above"),
        }
    }
}
