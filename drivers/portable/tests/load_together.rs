//! `WeightStore::load_together` (the generated loaders' call for a fused
//! q/k/v or gate/up group) through a real driver: each tensor is read and
//! released once, the ordinary per-weight loads then find them, and bad or
//! tied weights get the same treatment as one by one.

use std::cell::RefCell;
use std::collections::HashMap;

use pie_driver::ir::{LinearAttrs, Node, NodeOp, WeightBinding};
use pie_driver::loader::WeightStore;
use pie_driver::{DType, DriverError, TensorView, WeightSource};
use pie_driver_portable::PortableDriver;

/// f32 tensors by name, recording which were read and released.
struct Recording {
    tensors: HashMap<String, (Vec<usize>, Vec<u8>)>,
    reads: RefCell<Vec<String>>,
    releases: RefCell<Vec<String>>,
}

impl Recording {
    fn new(tensors: &[(&str, [usize; 2])]) -> Self {
        let tensors = tensors
            .iter()
            .map(|&(name, shape)| {
                let bytes = (0..shape[0] * shape[1])
                    .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
                    .collect();
                (name.to_string(), (shape.to_vec(), bytes))
            })
            .collect();
        Recording {
            tensors,
            reads: RefCell::default(),
            releases: RefCell::default(),
        }
    }
}

impl WeightSource for Recording {
    fn tensor(&self, name: &str) -> Result<TensorView<'_>, String> {
        self.reads.borrow_mut().push(name.to_string());
        let (shape, data) = self
            .tensors
            .get(name)
            .ok_or_else(|| format!("no tensor `{name}`"))?;
        Ok(TensorView {
            dtype: DType::F32,
            shape,
            data,
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn release(&self, name: &str) {
        self.releases.borrow_mut().push(name.to_string());
    }
}

/// A `linear` op `[out, 8]` whose weight is tensor `name`.
fn linear(name: &str, out: usize) -> Node {
    Node {
        op: NodeOp::Linear(LinearAttrs {
            in_features: 8,
            out_features: out,
        }),
        enabled: true,
        inputs: vec!["x".into()],
        outputs: vec![name.into()],
        weights: vec![WeightBinding {
            key: "weight".into(),
            name: Some(name.into()),
            template: None,
            shape: Some(vec![out, 8]),
            experts: None,
        }],
        out_widths: vec![out],
        origin: format!("test.toml: {name}"),
    }
}

fn names(list: &RefCell<Vec<String>>) -> Vec<String> {
    list.borrow().clone()
}

#[test]
fn a_group_is_read_once_and_found_by_the_per_weight_loads() {
    let source = Recording::new(&[("q", [16, 8]), ("k", [4, 8]), ("v", [4, 8])]);
    let driver = PortableDriver::new();
    let mut store = WeightStore::new(&driver, &source);
    let (q, k, v) = (linear("q", 16), linear("k", 4), linear("v", 4));
    store.load_together(&[&q, &k, &v], "weight").unwrap();
    assert_eq!(names(&source.reads), ["q", "k", "v"]);
    assert_eq!(names(&source.releases), ["q", "k", "v"]);
    for node in [&q, &k, &v] {
        store.required(node, "weight").unwrap();
    }
    assert_eq!(names(&source.reads), ["q", "k", "v"], "loaded twice");
}

#[test]
fn a_wrong_shape_in_a_group_names_the_tensor() {
    // The spec wants k as [4, 8]; the file has [5, 8].
    let source = Recording::new(&[("q", [16, 8]), ("k", [5, 8]), ("v", [4, 8])]);
    let driver = PortableDriver::new();
    let mut store = WeightStore::new(&driver, &source);
    let (q, k, v) = (linear("q", 16), linear("k", 4), linear("v", 4));
    match store.load_together(&[&q, &k, &v], "weight") {
        Err(DriverError::Shape {
            name,
            expected,
            found,
        }) => {
            assert_eq!(name, "k");
            assert_eq!((expected, found), (vec![4, 8], vec![5, 8]));
        }
        Err(other) => panic!("expected a shape error, got {other}"),
        Ok(()) => panic!("a [5, 8] tensor loaded as [4, 8]"),
    }
}

#[test]
fn tied_or_already_loaded_weights_are_left_to_the_one_by_one_load() {
    // k and v share one tensor: the group is not loaded together.
    let source = Recording::new(&[("q", [16, 8]), ("kv", [4, 8])]);
    let driver = PortableDriver::new();
    let mut store = WeightStore::new(&driver, &source);
    let (q, k, v) = (linear("q", 16), linear("kv", 4), linear("kv", 4));
    store.load_together(&[&q, &k, &v], "weight").unwrap();
    assert!(source.reads.borrow().is_empty());
    for node in [&q, &k, &v] {
        store.required(node, "weight").unwrap();
    }
    assert_eq!(names(&source.reads), ["q", "kv"]);
    // A group whose first weight is loaded already: left alone too.
    store.load_together(&[&q, &k], "weight").unwrap();
    assert_eq!(names(&source.reads), ["q", "kv"]);
}
