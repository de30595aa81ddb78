"""Shared config pieces: every field main.py and var_jax.trainers read, with defaults.

Config files build on `base_config()` and override what differs (big_vision style); tests and
command lines override further (`--config.transformer.total_steps=10`).
"""

import math

import ml_collections
from ml_collections import config_dict

from var_jax.models.var import PATCH_NUMS_256, PATCH_NUMS_512, var_config_for_depth

IMAGENET_TRAIN_IMAGES = 1_281_167


def optim(tblr, warmup_steps, *, wd=0.05, wd_end=None, wpe=0.01, clip=2.0):
    """AdamW (0.9, 0.95) with lr = tblr * batch / 256, the official lr schedule, cosine weight decay.

    sche: the official --sche ('lin0', 'lin', 'lin00', 'lin<T>', 'cos', 'exp'); '' = 'lin0', or 'lin<pg>' with
    progressive training (var_jax/optim.py).
    """
    return ml_collections.ConfigDict(
        dict(
            tblr=tblr,
            warmup_steps=warmup_steps,
            wp0=0.005,
            wpe=wpe,
            wd=wd,
            wd_end=wd if wd_end is None else wd_end,
            clip=clip,
            beta1=0.9,
            beta2=0.95,
            sche='',
        )
    )


def official_var(depth: int, shared_aln: bool = False) -> dict:
    """The depth-determined fields of the official VAR-d<depth> (var_jax.models.var.var_config_for_depth)."""
    official = var_config_for_depth(depth, shared_aln=shared_aln)
    return {k: official[k] for k in ('depth', 'embed_dim', 'num_heads', 'drop_path_rate', 'shared_aln')}


def base_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = 'tokenizer,transformer'  # which stages `--mode=train` runs, in order
    c.init_from = ''  # converted checkpoint, a run's export/ or hf:NAME: skips what it holds
    # Several processes (multi-host GPU / TPU pods, docs/training.md#multiple-hosts): distributed=True calls
    # jax.distributed.initialize, with JAX's own cluster detection (Cloud TPU, Slurm, Open MPI, Kubernetes) unless
    # cluster.* names the coordinator 'host:port', the number of processes and this one's id (python -m
    # var_jax.launch sets them for N processes on one machine). local_device_ids: '' = all, or e.g. '0,1'.
    c.distributed = False
    c.cluster = ml_collections.ConfigDict(
        dict(
            coordinator_address='',
            num_processes=0,
            process_id=-1,
            local_device_ids='',
            initialization_timeout_s=300,
            heartbeat_timeout_s=100,
        )
    )  # how long a lost process may stay silent
    # XLA's persistent compilation cache: a rerun loads its compiled steps instead of compiling them again
    # (minutes on TPU). '' = off; $JAX_COMPILATION_CACHE_DIR, when set, takes precedence.
    c.compile_cache_dir = '~/.cache/var_jax/xla'
    c.mesh = ml_collections.ConfigDict(dict(fsdp=1))  # devices per FSDP group; the rest is data parallel

    # Every field var_jax.data reads (it fills in nothing; var_jax/data/config.py says what each may hold).
    c.data = ml_collections.ConfigDict(
        dict(
            source='synthetic',  # 'synthetic' (offline shapes) | 'tfds' | 'folder'
            name='var_synthetic_shapes',  # TFDS name for source='tfds': 'cifar10', 'imagenet2012', ...
            data_dir=config_dict.placeholder(str),  # TFDS data_dir; None: $TFDS_DATA_DIR or ~/tensorflow_datasets
            folder='',  # source='folder': root/<class_name>/<images>
            eval_folder='',  # source='folder': evaluation images; '' = evaluate on `folder`
            train_split='train',
            eval_split='test',  # TFDS splits (slices like 'train[:90%]' too)
            image_size=32,  # R, the training resolution
            resize_ratio=1.125,  # short side -> round(resize_ratio * R), then an RxR crop
            random_flip=False,  # official VAR default: no horizontal flip
            shuffle_buffer=16384,  # examples; only TFDS splits too big to hold in memory
            in_memory_max_mb=1024,  # TFDS splits up to this encoded size are held in memory
            synthetic_seed=0,
            synthetic_train_size=10000,
            synthetic_test_size=1000,  # the synthetic dataset
            # The transformer stage on token maps the frozen tokenizer encodes once into <workdir>/tokens/ (no encoder
            # in the step; docs/training.md). pretokenize_crops views per image: the center crop and
            # pretokenize_crops - 1 random crops (each also flipped when random_flip), one drawn per image and epoch.
            pretokenize=False,
            pretokenize_crops=1,
        )
    )

    c.vae = ml_collections.ConfigDict(
        dict(
            vocab_size=4096,
            z_channels=32,
            ch=160,
            ch_mult=(1, 1, 2, 2, 4),
            num_res_blocks=2,
            patch_nums=PATCH_NUMS_256,
            beta=0.25,
            quant_resi=0.5,
            share_quant_resi=4,
            # Matmul precision ('highest' | 'high' | 'default'; same params) of the encoding path (encoder, quant_conv,
            # quantizer: token ids equal the float32 reference on TPU/GPU only at 'highest') and of the decoder; the
            # decoder's compute dtype ('float32' | 'bfloat16': half the activation memory on GPU/TPU).
            encode_precision='highest',
            decode_precision='default',
            decode_dtype='float32',
        )
    )
    c.var = ml_collections.ConfigDict(
        dict(
            num_classes=1000,  # <= 0: the dataset's number of classes
            **official_var(16),  # depth, width, heads, drop path and shared AdaLN of VAR-d16
            mlp_ratio=4.0,
            cond_drop_rate=0.1,
            attn_l2_norm=True,
            # Initialisation (the official --aln, --alng, --hd, --ini): AdaLN scale of the shift/scale columns, of the
            # gamma columns, the head's scale, and the weights' std (<= 0: sqrt(1 / (3 * width)), official).
            init_adaln=0.5,
            init_adaln_gamma=1e-3,
            init_head=0.02,
            init_std=-1.0,
            dtype='float32',  # compute dtype of the transformer blocks ('bfloat16' on GPU/TPU)
            # With a low-precision dtype: 'official' keeps the residual stream, the AdaLN modulation and the training
            # logits in float32 (the official fp16 autocast layout); 'lean' rounds them too (less memory).
            precision='official',
            # How the blocks run (same params, same math): one scan over the blocks (True; False: unrolled; None:
            # scan on TPU/GPU, unrolled on CPU), what the backward pass recomputes ('none', 'dots': keep matmul
            # outputs, 'dots_except_fc1': and recompute the MLP hidden, 'full') and the attention kernel ('auto':
            # splash on TPU, cuDNN on GPU for bf16, else XLA).
            scan=config_dict.placeholder(bool),
            remat='none',
            attention='auto',
        )
    )

    c.tokenizer = ml_collections.ConfigDict(
        dict(
            total_steps=10000,
            batch_size=64,
            l1=0.2,
            l2=1.0,
            restart_every=100,  # dead-code restart (0: off)
            # Optional PatchGAN (VQGAN) adversarial loss; disc_weight 0 = off (no discriminator at all).
            disc_weight=0.0,
            disc_start=2000,
            disc_lr=1e-4,
            disc_ndf=64,
            disc_layers=3,
            # Optional LPIPS-VGG perceptual loss; perceptual_weight 0 = off (no VGG at all). The weights: the .npz of
            # `python -m var_jax.convert --lpips_vgg16 vgg16-397923af.pth --lpips_lin vgg.pth` (docs/training.md).
            perceptual_weight=0.0,
            perceptual_weights_path='',
            optim=optim(1e-3, 500, wd=0.0, wpe=0.05),
        )
    )
    c.transformer = ml_collections.ConfigDict(
        dict(
            total_steps=10000,
            batch_size=256,
            label_smoothing=0.0,
            # Gradient accumulation (the official --ac): the batch runs as grad_accum micro-batches inside one step,
            # one update with the full batch's gradient and lr (activation memory of batch_size / grad_accum).
            grad_accum=1,
            # Progressive training (official default off): coarse scales first during the first pg of training,
            # from scale pg0; a new scale's loss weight ramps up over pgwp_steps (0: total_steps / 300, official).
            pg=0.0,
            pg0=4,
            pgwp_steps=0,
            optim=optim(1e-4, 500, wpe=0.1),
        )
    )

    c.log_every = 100
    c.eval_every = 0  # transformer validation (and FID) every N steps (0: at the end only)
    c.save_every = 1000
    c.sample_every = 5000
    c.keep_checkpoints = 3
    c.sample = ml_collections.ConfigDict(
        dict(
            num_images=64,
            ncols=8,
            batch_size=64,
            seed=0,
            labels='',  # labels: '' = spread over classes
            cfg=1.5,
            top_k=900,
            top_p=0.96,
            temperature=1.0,
            more_smooth=False,
        )
    )
    # --mode=eval (docs/evaluation.md): FID, sFID, IS, precision/recall of config.sample.* samples.
    c.eval = ml_collections.ConfigDict(
        dict(
            # --mode=eval scores 'samples' of the VAR (FID, sFID, IS, precision / recall) or the 'tokenizer''s
            # reconstructions of num_images eval-split images (PSNR, codebook usage / perplexity, rFID).
            what='samples',
            num_images=1000,
            batch_size=100,  # images scored, sampled in shards of batch_size (the paper: 50 000)
            inception_path='',  # .npz of `python -m var_jax.convert --inception <pytorch-fid .pth>`
            reference='',  # '' = config.data's eval split | ADM reference batch .npz | image dir
            reference_cache='',  # '' = beside the data (the .npz, the folder, data_dir)
            reference_resize_ratio=1.0,  # reference images: short side -> ratio * R, then the centre R x R
            reference_file_stats=True,  # FID/sFID against an ADM batch's own mu/sigma (comparable with ADM)
            is_splits=10,
            pr_k=3,  # Inception Score splits; precision/recall neighbourhood size
            write_npz=True,  # also write the samples as an ADM sample batch .npz
            # During training, every eval_every steps: validation loss / accuracy (the transformer) or reconstruction
            # metrics (the tokenizer) over val_batches eval-split batches (0: none), and the FID of train_num_images
            # samples (0: none; needs inception_path; the tokenizer's rFID uses it too).
            val_batches=4,
            train_num_images=1000,
        )
    )
    return c


def imagenet_config(depth, *, batch_size, epochs, tblr, alng, wpe, wd_end=0.05, image_size=256, shared_aln=False):
    """The official VAR ImageNet recipe (train.py, utils/arg_util.py) for VAR-d<depth> on the released tokenizer.

    Convert the tokenizer first and point init_from at it:
        python -m var_jax.convert --vae vae_ch160v4096z32.pth --out checkpoints/vae
    or let the run fetch and convert it: --config.init_from=hf:vae (hf:vae-512 for 512 px; var_jax.hub).
    """
    c = base_config()
    c.stages = 'transformer'
    c.init_from = 'checkpoints/vae'
    c.data.update(
        dict(source='tfds', name='imagenet2012', train_split='train', eval_split='validation', image_size=image_size)
    )
    c.vae.patch_nums = PATCH_NUMS_512 if image_size == 512 else PATCH_NUMS_256
    c.var.update(official_var(depth, shared_aln=shared_aln))
    c.var.update(dict(init_adaln_gamma=alng, dtype='bfloat16'))
    c.vae.decode_dtype = 'bfloat16'
    steps_per_epoch = math.ceil(IMAGENET_TRAIN_IMAGES / batch_size)
    c.transformer.update(dict(total_steps=epochs * steps_per_epoch, batch_size=batch_size))
    # Warm-up of epochs/50 epochs, as train.py's default --wp.
    c.transformer.optim = optim(tblr, round(epochs / 50 * steps_per_epoch), wd=0.05, wd_end=wd_end, wpe=wpe)
    c.log_every, c.save_every, c.sample_every = 100, 5000, 20000
    # Validation on the whole 50 000-image split every 10 epochs, as the official trainer does.
    c.eval_every, c.eval.val_batches = 10 * steps_per_epoch, math.ceil(50_000 / batch_size)
    c.eval.update(dict(num_images=50_000, batch_size=250))  # FID-50K: 50 per class, as the paper
    c.mesh.fsdp = 1
    return c
