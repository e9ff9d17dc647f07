"""The ``mrkd`` subcommands, in one place: the click group (mrkd/cli.py) lists them and setup.py
installs an ``mrkd-<name>`` script for each. Plain data, no imports: setup.py reads it before
anything is installed."""

# name -> ("module:attribute", one-line help shown by `mrkd --help` without importing the module)
COMMANDS = {
    "generate": ("mrkd.train.cli:generate_command",
                 "Write the embedded synthetic MVTec-layout data set (procedural surfaces and defects)."),
    "train": ("mrkd.train.cli:train_command", "Train an MRKD model on good images (one or all categories)."),
    "calibrate": ("mrkd.calibrate_cli:calibrate_command",
                  "Set the alarm threshold of a checkpoint or exported model from good (or labelled) images."),
    "eval": ("mrkd.train.cli:eval_command", "Image/pixel AUROC, AUPRO, F1 at the threshold, ROC plots."),
    "predict": ("mrkd.train.cli:predict_command", "Score images: scores.csv, maps (.npy) and heatmap overlays."),
    "export": ("mrkd.export.cli:export_command", "Export a checkpoint to ONNX (and TensorRT with --fp16/--int8)."),
    "run": ("mrkd.runtime.cli:run_command", "Stream camera/video frames through an exported model; raise alarms."),
    "cameras": ("mrkd.cameras_cli:cameras_command", "List the GigE Vision (GenICam) cameras Aravis finds."),
    "bench": ("mrkd.benchmarks.cli:bench_command", "Measure every stage and backend against the official pipeline."),
    "review": ("mrkd.review_cli:review_command",
               "List alarms of an events log; mark one a good part (false alarm) or a confirmed defect."),
    "refit": ("mrkd.refit_cli:refit_command",
              "A new model version: reviewed good parts into the memory bank, threshold set again."),
    "demo": ("mrkd.demo:demo_command", "The whole path on the embedded data: generate, train, eval, export, run."),
}
