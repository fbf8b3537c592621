"""The base configuration: every key the trainer reads, with what it means and its default.

The recipes in configs/ start from it (`from resnet_jax import base_config`) and override what
their recipe changes, so a recipe copied anywhere works. Any key can also be overridden on the
command line, e.g.

    python -m resnet_jax.train --config configs/r50.py --workdir workdir/r50_adam \
        --config.optimizer.name=adam --config.optimizer.learning_rate=1e-3

Epoch-based keys (warmup_epochs, boundaries_epochs, ...) are converted to optimizer steps with
steps_per_epoch = train examples // batch_size, so a recipe keeps its shape at any batch size.
"""

import ml_collections

from resnet_jax import optim


def get_config() -> ml_collections.ConfigDict:
    """The defaults: ResNet-18 with the CIFAR stem, SGD + cosine, 200 epochs on CIFAR-10."""
    config = ml_collections.ConfigDict()

    config.model = model = ml_collections.ConfigDict()
    # resnet18/34/50/101/152 (torchvision) or resnet20/32/44/56/110/1202 (He et al. CIFAR nets).
    model.name = "resnet18"
    # "cifar" (3x3 stride-1 conv, no max-pool: for 32x32 images) or "imagenet" (7x7/2 + max-pool);
    # the He et al. nets always have their own 3x3 stem, so it is ignored for them.
    model.stem = "cifar"
    # "A" (strided identity, zero-padded channels) or "B" (1x1 projection); "" = the family's own
    # (B for resnet18..152, A for resnet20..1202).
    model.shortcut = ""
    model.residual = True  # False: the plain twin (the same layers without shortcuts)
    model.width = 0  # base width, doubled at each stage; 0 = the family's own (64, or 16)
    model.zero_init_residual = False  # start each block's last BN scale at 0 (block = identity)
    # torchvision weights to start from (.pth, .safetensors, or a `resnet_jax.convert` output
    # directory); "" trains from scratch. Layers whose shapes differ (e.g. the head) stay fresh.
    model.pretrained = ""
    # What does not train: "none", "backbone" (everything but the head), or "k" for the stem and
    # the first k stages (e.g. "2"). Frozen BN layers keep their running statistics.
    model.freeze = "none"
    # Which kernels run the model: "auto" = the CPU kernel plug-in only on one CPU device, plain
    # Flax elsewhere; "xla" = plain Flax always; "cpu" = the CPU kernels.
    model.kernels = "auto"
    # With model.pretrained, frozen layers must come from it: freezing one it does not cover (the
    # CIFAR stem's 3x3 conv1 has no ImageNet counterpart) would keep it random, an error unless
    # this is True.
    model.freeze_random_layers = False
    # Stochastic depth: at training, drop each block's residual branch for a random fraction of
    # the examples (the rest scaled by 1/keep), rising linearly from 0 at the first block to this
    # rate at the last, as timm's drop_path_rate (e.g. 0.05-0.1 on ResNet-50); 0 = off.
    model.drop_path_rate = 0.0

    config.dataset = dataset = ml_collections.ConfigDict()
    # "cifar10", any tfds image-classification dataset, or "folder:/path" (train/ test/ [val/]).
    dataset.name = "cifar10"
    dataset.data_dir = ""  # tfds data directory; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    dataset.image_size = 0  # resize every image once on load to this square size; 0 = as stored
    # Fraction of the training examples held out (stratified, seeded) as the validation split that
    # picks the best checkpoint; 0 = none (a dataset's own validation split is used if it has one).
    dataset.val_fraction = 0.1
    dataset.verify_checksums = True  # check a manually downloaded archive against tfds' sha256
    # How images reach the steps: "memory" (every split decoded into host memory once, before the
    # first step), "stream" (read, decoded and cropped to image_size while training, by grain
    # worker processes: for datasets larger than memory) or "auto" (memory when the decoded train
    # split fits memory_budget_gb, else stream; the log says which and why).
    dataset.pipeline = "auto"
    dataset.memory_budget_gb = 8.0  # "auto": the most host memory the decoded train split may take
    dataset.stream_workers = 4  # stream mode: decoding processes per host (0 = in the main one)

    config.augment = augment = ml_collections.ConfigDict()
    augment.crop_padding = 4  # zero-pad by this many pixels, then crop randomly (0 = no crop)
    augment.crop_size = 0  # random crop size; 0 = the image size
    # True: a smaller crop is resized back to the image size (train and eval sizes agree). False:
    # the model trains at crop_size (torchvision's RandomCrop) and evaluates on the centre crop.
    augment.resize_crop = True
    augment.flip = True  # random left-right flips
    augment.rotation = 0.0  # random rotation in [-rotation, rotation] degrees; 0 = none
    augment.rotation_from_zero = False  # rotate by [0, rotation] degrees instead
    augment.rotation_interpolation = "bilinear"  # or "nearest" (torchvision's RandomRotation)
    augment.cutout = 0  # zero a random square of this size; 0 = none
    augment.resize_to = 0  # resize on the device (train and eval) to this square size; 0 = none
    # RandAugment or TrivialAugmentWide as torchvision defines them, applied after crop and flip:
    # "none", "randaugment" or "trivialaugment" (its own random op and magnitude per image).
    augment.policy = "none"
    augment.randaugment_num_ops = 2  # RandAugment's N: ops applied in turn to each image
    augment.randaugment_magnitude = 9  # RandAugment's M: the magnitude bin, 0..30
    # Random erasing (timm's RandomErasing, one box per image) after normalization: the
    # probability that an image gets a box; 0 = off, 0.5 = timm's default (Zhong et al.'s
    # Fashion-MNIST setting: 0.5 with max_area 0.4 and min_aspect 0.3).
    augment.random_erasing = 0.0
    augment.random_erasing_min_area = 0.02  # the box's area, U(min, max) x the image's
    augment.random_erasing_max_area = 1 / 3  # timm's; Zhong et al.'s 0.4
    augment.random_erasing_min_aspect = 0.3  # its height / width, log-uniform in [min, 1 / min]
    # The box's fill: "const" (0, the dataset mean after normalization: timm's default), "rand" (a
    # normal(0, 1) value per channel) or "pixel" (one per pixel and channel: timm's train.py).
    augment.random_erasing_mode = "const"
    # mixup / CutMix of each batch with itself reversed, one lam ~ Beta(alpha, alpha) per batch
    # (timm's batch mode). Train accuracy is then against each image's dominant label.
    augment.mixup_alpha = 0.0  # mixup's alpha, e.g. 0.2 (torchvision), 0.8 (DeiT); 0 = off
    augment.cutmix_alpha = 0.0  # CutMix's alpha, usually 1.0; 0 = off
    augment.mix_prob = 1.0  # probability that a batch is mixed (timm's mixup_prob)
    augment.mix_switch_prob = 0.5  # with both alphas > 0: probability of CutMix over mixup
    # Per-channel mean/std: "cifar10" or "imagenet" (their published RGB statistics), "dataset"
    # (each channel's, measured on the train split once at the run's start: every image in memory
    # mode, 1000 sampled in stream mode; checkpoints record them for evaluate, predict and export),
    # or "auto": CIFAR-10's for CIFAR-10 from scratch, ImageNet's with pretrained weights and other
    # RGB datasets (as always), "dataset" for images that are not RGB (gray). For another RGB
    # dataset trained from scratch, "dataset" is the sensible choice: set it.
    augment.normalization = "auto"

    # The optimizer and the learning-rate schedule: their names, options, defaults, meanings and
    # limits are defined once, in resnet_jax/optim.py (OPTIMIZERS, SCHEDULES).
    for section in ("optimizer", "schedule"):
        options = optim.config_options(section).values()
        config[section] = ml_collections.ConfigDict({o.key: o.default for o in options})

    config.ema = ema = ml_collections.ConfigDict()
    # Exponential moving average of the weights, updated after every optimizer update: average =
    # decay * average + (1 - decay) * weights, over params AND BatchNorm statistics (as timm's
    # ModelEmaV2 averages the whole state_dict). 0 = off; e.g. 0.9999 for ~10k-update horizons.
    ema.decay = 0.0
    # Warm the decay up: min(decay, (1 + t) / (10 + t)) after t updates (TensorFlow's
    # ExponentialMovingAverage with num_updates), so early averages forget the initial weights.
    ema.warmup = False
    # With an EMA, which weights ("ema" or "raw") pick the best checkpoint by validation accuracy
    # and give results.json's headline figures and evaluate's and predict's outputs (both are
    # evaluated each epoch and on the test split).
    ema.weights = "ema"

    # Global batch of one optimizer update, over all devices and hosts (with gradient accumulation,
    # the sum of its optimizer.grad_accumulation_steps micro-batches).
    config.batch_size = 128
    config.eval_batch_size = 512  # global batch for evaluation (no gradients, so it can be larger)
    config.num_epochs = 200  # an epoch = train examples // batch_size steps (optimizer updates)
    config.num_steps = 0  # > 0: train this many steps instead, the last epoch cut short (a
    # --config.num_epochs on the command line sets it back to 0)
    config.seed = 0  # initialization, augmentation and data order
    config.parallel = "jit"  # "jit" (shard the batch over a device mesh) or "pmap"
    config.half_precision = False  # bfloat16 compute (params and loss stay float32)
    config.label_smoothing = 0.0  # cross-entropy label smoothing
    config.checkpoint_every_epochs = 1  # also saved at the end and on SIGTERM/SIGINT
    config.keep_checkpoints = 2  # the latest this many, plus the best by validation accuracy
    # Which checkpoint results.json tests: "best_val" (the best by validation accuracy; the latest
    # without a validation split) or "final" (the last, as He et al. report theirs).
    config.results_checkpoint = "best_val"
    config.log_every_steps = 100  # how often train metrics are fetched from the device and logged
    # A jax.profiler trace of the train steps start_step + 1 .. start_step + num_steps (counted
    # from 1) into <workdir>/profile, for TensorBoard's profile plugin or Perfetto; 0 steps = off.
    config.profile = profile = ml_collections.ConfigDict()
    profile.start_step = 10  # steps before the trace: compiling and warm-up stay out of it
    profile.num_steps = 0  # how many steps to trace; 0 = no trace
    # JAX's persistent compilation cache: a rerun skips compiling; "" turns it off.
    config.compilation_cache_dir = "~/.cache/resnet_jax/jax_cache"
    return config
