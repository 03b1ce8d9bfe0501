//! The workflow graph: nodes joined by the artifacts they read from each other.

use std::collections::HashMap;
use std::fmt::Write;

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use petgraph::Direction;
use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;

use crate::error::{Error, Result};
use crate::stage::{Input, Node};

/// A validated DAG of nodes: unique ids, every artifact input produced upstream, no cycle.
pub struct Dag {
    graph: DiGraph<Node, String>,
    order: Vec<NodeIndex>,
}

impl Dag {
    /// Builds the graph; a duplicate id, a dangling input or a cycle is an error naming the nodes.
    pub fn new(nodes: Vec<Node>) -> Result<Dag> {
        let mut graph = DiGraph::new();
        let mut by_id = HashMap::new();
        for node in nodes {
            let id = node.id.clone();
            let idx = graph.add_node(node);
            if by_id.insert(id.clone(), idx).is_some() {
                return Err(Error::DuplicateNode(id));
            }
        }
        for idx in graph.node_indices().collect::<Vec<_>>() {
            let node = &graph[idx];
            let mut edges = Vec::new();
            for input in node.stage.inputs() {
                let Input::Artifact { name, node: from, artifact } = input else {
                    continue;
                };
                let &src = by_id.get(from.id()).ok_or_else(|| Error::DanglingInput {
                    node: node.id.clone(),
                    input: name.clone(),
                    from: from.to_string(),
                })?;
                let outputs = graph[src].stage.outputs();
                if !outputs.iter().any(|o| o.name == artifact) {
                    let available: Vec<&str> = outputs.iter().map(|o| o.name).collect();
                    return Err(Error::UnknownArtifact {
                        node: node.id.clone(),
                        artifact: artifact.to_owned(),
                        from: from.to_string(),
                        available: available.join(", "),
                    });
                }
                edges.push((src, artifact.to_owned()));
            }
            for (src, artifact) in edges {
                graph.add_edge(src, idx, artifact);
            }
        }
        let order = stable_toposort(&graph).ok_or_else(|| {
            let cycles: Vec<String> = tarjan_scc(&graph)
                .into_iter()
                .filter(|scc| scc.len() > 1 || graph.contains_edge(scc[0], scc[0]))
                .map(|scc| {
                    let mut ids: Vec<&str> = scc.iter().map(|&i| graph[i].id.as_str()).collect();
                    ids.sort();
                    ids.join(" ⇄ ")
                })
                .collect();
            Error::Cycle(cycles.join("; "))
        })?;
        Ok(Dag { graph, order })
    }

    /// Node indices in topological order; among nodes ready together, declaration order.
    pub fn order(&self) -> &[NodeIndex] {
        &self.order
    }

    /// The node at `idx`.
    pub fn node(&self, idx: NodeIndex) -> &Node {
        &self.graph[idx]
    }

    /// Index of the node with id `id`.
    pub fn index_of(&self, id: &str) -> Option<NodeIndex> {
        self.graph.node_indices().find(|&i| self.graph[i].id == id)
    }

    /// Nodes whose stage name or node id is `name`, in topological order.
    pub fn matching(&self, name: &str) -> Vec<NodeIndex> {
        self.order.iter().copied().filter(|&i| self.graph[i].stage_name == name || self.graph[i].id == name).collect()
    }

    /// The stage names of this DAG, for an error about `unknown` (with the nearest as a suggestion).
    pub fn describe_names(&self, unknown: &str) -> String {
        let mut stages: Vec<&str> = Vec::new();
        for &i in &self.order {
            let name = self.graph[i].stage_name.as_str();
            if !stages.contains(&name) {
                stages.push(name);
            }
        }
        let ids = self.order.iter().map(|&i| self.graph[i].id.as_str());
        let nearest = stages
            .iter()
            .copied()
            .chain(ids)
            .map(|c| (strsim::levenshtein(c, unknown), c))
            .filter(|(d, c)| *d <= 2.max(c.len() / 3))
            .min();
        let mut out = format!("its stages are: {}", stages.join(", "));
        if let Some((_, c)) = nearest {
            out.push_str(&format!(" (did you mean `{c}`?)"));
        }
        out
    }

    /// The part of this DAG that `targets` need: the targets and every node they read from,
    /// directly or not, in declaration order.
    pub fn with_ancestors(&self, targets: &[NodeIndex]) -> Dag {
        let mut needed = vec![false; self.graph.node_count()];
        let mut todo = targets.to_vec();
        while let Some(idx) = todo.pop() {
            if !std::mem::replace(&mut needed[idx.index()], true) {
                todo.extend(self.parents(idx));
            }
        }
        let nodes = self.graph.node_indices().filter(|i| needed[i.index()]).map(|i| self.graph[i].clone()).collect();
        Dag::new(nodes).expect("a node's ancestors form a valid DAG")
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.graph.node_count()
    }

    /// Whether the graph has no node.
    pub fn is_empty(&self) -> bool {
        self.graph.node_count() == 0
    }

    /// Nodes that read from `idx`.
    pub fn children(&self, idx: NodeIndex) -> impl Iterator<Item = NodeIndex> + '_ {
        self.graph.neighbors_directed(idx, Direction::Outgoing)
    }

    /// Nodes `idx` reads from.
    pub fn parents(&self, idx: NodeIndex) -> impl Iterator<Item = NodeIndex> + '_ {
        self.graph.neighbors_directed(idx, Direction::Incoming)
    }

    /// The files and directories outside the store that `idx` reads, as (input name, path).
    fn externals(&self, idx: NodeIndex) -> Vec<(String, std::path::PathBuf)> {
        self.graph[idx]
            .stage
            .inputs()
            .into_iter()
            .filter_map(|i| match i {
                Input::External { name, path } => Some((name, path)),
                Input::Artifact { .. } => None,
            })
            .collect()
    }

    /// The graph as indented text: each node with the nodes it reads from and, on lines below it,
    /// the files outside the store it reads.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for &idx in &self.order {
            let node = &self.graph[idx];
            let _ = write!(out, "{} ({})", node.id, node.stage.kind());
            let mut from: Vec<String> = self
                .graph
                .edges_directed(idx, Direction::Incoming)
                .map(|e| format!("{}:{}", self.graph[e.source()].id, e.weight()))
                .collect();
            from.sort();
            if !from.is_empty() {
                let _ = write!(out, "  ← {}", from.join(", "));
            }
            out.push('\n');
            for (name, path) in self.externals(idx) {
                let _ = writeln!(out, "    ← {name}: {}", path.display());
            }
        }
        out
    }

    /// The graph in Graphviz dot; files outside the store are notes feeding their nodes.
    pub fn to_dot(&self) -> String {
        let mut out = String::from("digraph workflow {\n  rankdir=LR;\n  node [shape=box];\n");
        let mut files: Vec<std::path::PathBuf> = Vec::new();
        for &idx in &self.order {
            let _ = writeln!(out, "  n{} [label={:?}];", idx.index(), self.graph[idx].id);
            for (name, path) in self.externals(idx) {
                let f = files.iter().position(|p| *p == path).unwrap_or_else(|| {
                    let _ = writeln!(out, "  f{} [shape=note, label={:?}];", files.len(), path.display().to_string());
                    files.push(path);
                    files.len() - 1
                });
                let _ = writeln!(out, "  f{f} -> n{} [label={name:?}];", idx.index());
            }
        }
        for e in self.graph.edge_references() {
            let _ = writeln!(out, "  n{} -> n{} [label={:?}];", e.source().index(), e.target().index(), e.weight());
        }
        out.push_str("}\n");
        out
    }
}

/// Kahn's algorithm taking the earliest-declared ready node first; `None` on a cycle.
fn stable_toposort(graph: &DiGraph<Node, String>) -> Option<Vec<NodeIndex>> {
    let mut waiting: Vec<usize> =
        graph.node_indices().map(|i| graph.neighbors_directed(i, Direction::Incoming).count()).collect();
    let mut ready: BinaryHeap<Reverse<NodeIndex>> =
        graph.node_indices().filter(|i| waiting[i.index()] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(graph.node_count());
    while let Some(Reverse(idx)) = ready.pop() {
        order.push(idx);
        for child in graph.neighbors_directed(idx, Direction::Outgoing) {
            waiting[child.index()] -= 1;
            if waiting[child.index()] == 0 {
                ready.push(Reverse(child));
            }
        }
    }
    (order.len() == graph.node_count()).then_some(order)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::stage::{Context, NodeRef, Output, Stage, StageError};

    const OUT: schemas::artifacts::Blob = schemas::artifacts::Blob { file: "out" };

    struct Fake {
        inputs: Vec<Input>,
    }

    impl Stage for Fake {
        fn kind(&self) -> &str {
            "fake"
        }
        fn code_version(&self) -> &str {
            "1"
        }
        fn params(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
        fn inputs(&self) -> Vec<Input> {
            self.inputs.clone()
        }
        fn outputs(&self) -> Vec<Output> {
            vec![(&OUT).into()]
        }
        fn run(&self, _: &Context) -> Result<(), StageError> {
            Ok(())
        }
    }

    fn node(id: &str, from: &[&str]) -> Node {
        // A handle by id, as no plan could make one: so that cycles and dangling inputs can be built.
        let inputs = from.iter().map(|f| Input::artifact(f, &NodeRef(f.to_string()), &OUT)).collect();
        Node::new(id, None, Arc::new(Fake { inputs }))
    }

    #[test]
    fn orders_topologically() {
        let dag = Dag::new(vec![node("c", &["b"]), node("x", &[]), node("b", &["a"]), node("a", &[])]).unwrap();
        let ids: Vec<_> = dag.order().iter().map(|&i| dag.node(i).id.as_str()).collect();
        assert_eq!(ids, ["x", "a", "b", "c"]);
        assert!(dag.to_dot().contains("->"));
        assert!(dag.to_text().contains("c (fake)  ← b:out"));
    }

    #[test]
    fn cycle_names_its_nodes() {
        let err =
            Dag::new(vec![node("a", &["c"]), node("b", &["a"]), node("c", &["b"]), node("d", &[])]).err().unwrap();
        assert_eq!(err.to_string(), "the workflow has a cycle through: a ⇄ b ⇄ c");
    }

    #[test]
    fn dangling_input_names_both_ends() {
        use schemas::artifacts::Blob;
        let err = Dag::new(vec![node("a", &["ghost"])]).err().unwrap();
        assert!(err.to_string().contains("node `a` reads input `ghost` from `ghost`"), "{err}");
        let bad = Node::new(
            "b",
            None,
            Arc::new(Fake { inputs: vec![Input::artifact("x", &NodeRef("a".into()), &Blob { file: "nope" })] }),
        );
        let err = Dag::new(vec![node("a", &[]), bad]).err().unwrap();
        assert!(err.to_string().contains("declares no such output (it writes: out)"), "{err}");
    }

    #[test]
    fn external_inputs_are_shown() {
        let reads = Node::new("r", None, Arc::new(Fake { inputs: vec![Input::external("csv", "/d/labels.csv")] }));
        let dag = Dag::new(vec![reads, node("s", &["r"])]).unwrap();
        assert_eq!(dag.to_text(), "r (fake)\n    ← csv: /d/labels.csv\ns (fake)  ← r:out\n");
        let dot = dag.to_dot();
        assert!(
            dot.contains("f0 [shape=note, label=\"/d/labels.csv\"];") && dot.contains("f0 -> n0 [label=\"csv\"];"),
            "{dot}"
        );
    }

    #[test]
    fn unknown_names_list_the_stages_and_the_nearest() {
        let dag = Dag::new(vec![node("train", &[]), node("report", &["train"])]).unwrap();
        assert_eq!(dag.matching("train").len(), 1);
        assert_eq!(dag.describe_names("trian"), "its stages are: train, report (did you mean `train`?)");
        assert_eq!(dag.describe_names("zzzzzzzz"), "its stages are: train, report");
    }

    #[test]
    fn a_target_brings_its_ancestors_only() {
        let dag = Dag::new(vec![node("a", &[]), node("b", &["a"]), node("c", &["b"]), node("x", &["a"])]).unwrap();
        let part = dag.with_ancestors(&dag.matching("b"));
        let ids: Vec<_> = part.order().iter().map(|&i| part.node(i).id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        let both = dag.with_ancestors(&[dag.index_of("c").unwrap(), dag.index_of("x").unwrap()]);
        assert_eq!(both.len(), 4);
    }

    #[test]
    fn duplicate_ids_rejected() {
        assert!(matches!(Dag::new(vec![node("a", &[]), node("a", &[])]), Err(Error::DuplicateNode(_))));
    }
}
