// Average-intensity projections inside the lung masks, per HU band and sub-region (paper
// 2.2-2.3). Two kernels share the ray walk below:
//   sapsam_project_bands_3d_<dtype>         already-rotated volumes: all six sub-regions and all
//                                           bands in one pass (NumPy twin:
//                                           subregion_band_projections(use_kernel=False))
//   sapsam_rotate_project_bands_3d_<dtype>  rotation fused with projection: rays of the R rotated
//                                           volumes sample the unrotated one, so the rotated
//                                           volumes never exist (NumPy twin:
//                                           rotate_project(method="twin"))
// Built by sapsam_jax/preprocess/_gpu_kernels.py through _kernels.load_kernel.
//
// Preamble:
//   AXIS            0 axial (ray along k), 1 coronal (along j), 2 sagittal (along i)
//   NK, NJ, NI      working-grid shape (k, j, i)
//   HU_T            HU element type (float or short)
//   SAPSAM_NAME(b)  kernel name with the HU dtype suffix, e.g. b##_f32
//   NBANDS, BAND_LO, BAND_HI   HU bands as brace lists; band b is [lo, hi), the last [lo, hi]
//   FILL_HU, MASK_THRESHOLD    outside value and mask re-threshold (GeometryConfig)
//
// One thread owns one ray (one output pixel of the whole-volume image) and walks it once,
// accumulating the band sums and counts of every sub-region it crosses: an axial ray crosses
// the three k-thirds, a sagittal ray the two i-halves, a coronal ray stays in one sub-region.

#define SUB_K (NK / 3)  // sub-region thirds along k (paper 2.3: 72 on the paper grid)
#define SUB_I (NI / 2)  // halves along i: i < NI/2 is the patient's right
#define NSUB 6

#if AXIS == 0
#define RAY_N NK
#define IMG_H NJ
#define IMG_W NI
#define SUB_H NJ
#define SUB_W SUB_I
#elif AXIS == 1
#define RAY_N NJ
#define IMG_H NK
#define IMG_W NI
#define SUB_H SUB_K
#define SUB_W SUB_I
#elif AXIS == 2
#define RAY_N NI
#define IMG_H NK
#define IMG_W NJ
#define SUB_H SUB_K
#define SUB_W NJ
#else
#error "AXIS must be 0, 1 or 2"
#endif

// Voxel (k, j, i) at step t of the ray through image pixel (p, q).
__device__ __forceinline__ void ray_voxel(int p, int q, int t, int& k, int& j, int& i) {
#if AXIS == 0
    k = t; j = p; i = q;
#elif AXIS == 1
    k = p; j = t; i = q;
#else
    k = p; j = q; i = t;
#endif
}

// Sub-region of voxel (k, i) in config.SUBREGIONS order (left_upper .. right_lower), -1 if none.
__device__ __forceinline__ int subregion_of(int k, int i) {
    const int level = k / SUB_K;  // 0 lower, 1 middle, 2 upper (k runs toward Superior)
    const int half = i / SUB_I;   // 0 patient's right, 1 left (i runs toward Left)
    if (level > 2 || half > 1) return -1;
    return (half == 1 ? 0 : 3) + (2 - level);
}

// Pixel of the ray in its sub-region's image; the same for every step of the ray.
__device__ __forceinline__ void subregion_pixel(int p, int q, int& y, int& x) {
#if AXIS == 0
    y = p; x = q % SUB_I;
#elif AXIS == 1
    y = p % SUB_K; x = q % SUB_I;
#else
    y = p % SUB_K; x = q;
#endif
}

struct BandAcc {
    float sum[NBANDS];
    int count[NBANDS];
};

__device__ __forceinline__ void band_reset(BandAcc& a) {
#pragma unroll
    for (int b = 0; b < NBANDS; ++b) { a.sum[b] = 0.f; a.count[b] = 0; }
}

__device__ __forceinline__ void band_add(BandAcc& a, float v) {
    const float lo[NBANDS] = BAND_LO;
    const float hi[NBANDS] = BAND_HI;
#pragma unroll
    for (int b = 0; b < NBANDS; ++b) {
        const bool below_hi = (b == NBANDS - 1) ? (v <= hi[b]) : (v < hi[b]);
        if (v >= lo[b] && below_hi) { a.sum[b] += v; a.count[b] += 1; }
    }
}

__device__ __forceinline__ float rescale01(float mean, float lo, float hi) {
    return fminf(fmaxf((mean - lo) / (hi - lo), 0.f), 1.f);
}

// Mean per band, rescaled to [0, 1] within the band; 0 where the ray met no voxel of the band.
__device__ __forceinline__ void band_store(const BandAcc& a, float* out) {
    const float lo[NBANDS] = BAND_LO;
    const float hi[NBANDS] = BAND_HI;
#pragma unroll
    for (int b = 0; b < NBANDS; ++b) {
        out[b] = a.count[b] > 0 ? rescale01(a.sum[b] / (float)a.count[b], lo[b], hi[b]) : 0.f;
    }
}

// bands: (R, NSUB, SUB_H, SUB_W, NBANDS) float32, C order.
__device__ __forceinline__ float* band_out(float* bands, int r, int s, int y, int x) {
    return bands + ((((long long)r * NSUB + s) * SUB_H + y) * SUB_W + x) * NBANDS;
}

// Walk the ray through pixel (p, q) of volume/rotation r. `sample(k, j, i, v, in_gray, in_band)`
// gives the HU and the two mask tests at output voxel (k, j, i). With WITH_GRAY the whole-scan
// gray image (R, IMG_H, IMG_W) gets the mean HU over in_gray voxels, rescaled by the window.
template <bool WITH_GRAY, class Sampler>
__device__ __forceinline__ void project_ray(const Sampler& sample, int r, int p, int q,
                                            float* gray, float* bands, float gray_lo,
                                            float gray_hi) {
    int k, j, i, y, x;
    subregion_pixel(p, q, y, x);
    ray_voxel(p, q, 0, k, j, i);
    int sub = subregion_of(k, i);
    BandAcc acc;
    band_reset(acc);
    float gray_sum = 0.f;
    int gray_count = 0;
    for (int t = 0; t < RAY_N; ++t) {
        ray_voxel(p, q, t, k, j, i);
        const int s = subregion_of(k, i);
        if (s != sub) {  // the ray enters the next third/half: flush, same t for the whole warp
            if (sub >= 0) band_store(acc, band_out(bands, r, sub, y, x));
            band_reset(acc);
            sub = s;
        }
        float v;
        bool in_gray, in_band;
        sample(k, j, i, v, in_gray, in_band);
        if (WITH_GRAY && in_gray) { gray_sum += v; gray_count += 1; }
        if (in_band && sub >= 0) band_add(acc, v);
    }
    if (sub >= 0) band_store(acc, band_out(bands, r, sub, y, x));
    if (WITH_GRAY) {
        gray[((long long)r * IMG_H + p) * IMG_W + q] =
            gray_count > 0 ? rescale01(gray_sum / (float)gray_count, gray_lo, gray_hi) : 0.f;
    }
}

// ---- Kernel 1: band projection of already-rotated volumes, one pass over each volume. ----

struct DirectSampler {
    const HU_T* hu;
    const unsigned char* mask;  // nonzero = inside the (refined) lung mask

    __device__ __forceinline__ void operator()(int k, int j, int i, float& v, bool& in_gray,
                                               bool& in_band) const {
        const int idx = (k * NJ + j) * NI + i;
        v = (float)hu[idx];
        in_band = mask[idx] != 0;
        in_gray = false;
    }
};

// hu, mask: (R, NK, NJ, NI); bands: (R, 6, SUB_H, SUB_W, NBANDS) zero-filled by the caller.
// Grid: x over IMG_H * IMG_W rays, y over the R volumes.
extern "C" __global__ void SAPSAM_NAME(sapsam_project_bands_3d)(const HU_T* __restrict__ hu,
                                                                const unsigned char* __restrict__ mask,
                                                                float* __restrict__ bands) {
    const int pixel = blockIdx.x * blockDim.x + threadIdx.x;
    if (pixel >= IMG_H * IMG_W) return;
    const int r = blockIdx.y;
    const long long volume = (long long)r * NK * NJ * NI;
    const DirectSampler sample{hu + volume, mask + volume};
    project_ray<false>(sample, r, pixel / IMG_W, pixel % IMG_W, nullptr, bands, 0.f, 1.f);
}

// ---- Kernel 2: rotation fused with projection (paper 2.3, the 27 rotations). ----

struct RotatedSampler {
    const HU_T* hu;
    const unsigned char* masks;  // bit 0: conservative mask (gray), bit 1: refined mask (bands)
    float m[9];                  // output voxel o samples input x = m o + off (m = R^T)
    float off[3];

    // Trilinear HU and masks at x; a mask counts where its trilinear value >= MASK_THRESHOLD.
    // Outside [0, n-1] on any axis is FILL_HU and outside both masks, as scipy's mode="constant".
    __device__ __forceinline__ void operator()(int k, int j, int i, float& v, bool& in_gray,
                                               bool& in_band) const {
        const float fk = (float)k, fj = (float)j, fi = (float)i;
        const float xk = fmaf(m[0], fk, fmaf(m[1], fj, fmaf(m[2], fi, off[0])));
        const float xj = fmaf(m[3], fk, fmaf(m[4], fj, fmaf(m[5], fi, off[1])));
        const float xi = fmaf(m[6], fk, fmaf(m[7], fj, fmaf(m[8], fi, off[2])));
        if (!(xk >= 0.f && xk <= (float)(NK - 1) && xj >= 0.f && xj <= (float)(NJ - 1) &&
              xi >= 0.f && xi <= (float)(NI - 1))) {
            v = FILL_HU;
            in_gray = in_band = false;
            return;
        }
        const int k0 = min((int)xk, NK - 2), j0 = min((int)xj, NJ - 2), i0 = min((int)xi, NI - 2);
        const float wk = xk - (float)k0, wj = xj - (float)j0, wi = xi - (float)i0;
        float h = 0.f, mc = 0.f, mr = 0.f;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            const int dk = c >> 2, dj = (c >> 1) & 1, di = c & 1;
            const float w = (dk ? wk : 1.f - wk) * (dj ? wj : 1.f - wj) * (di ? wi : 1.f - wi);
            const int idx = ((k0 + dk) * NJ + (j0 + dj)) * NI + (i0 + di);
            const unsigned char bits = masks[idx];
            h = fmaf(w, (float)hu[idx], h);
            mc = fmaf(w, (float)(bits & 1), mc);
            mr = fmaf(w, (float)((bits >> 1) & 1), mr);
        }
        v = h;
        in_gray = mc >= MASK_THRESHOLD;
        in_band = mr >= MASK_THRESHOLD;
    }
};

// hu, masks: (NK, NJ, NI); affines: (R, 12) float32 = 3x3 m row-major, then off.
// gray: (R, IMG_H, IMG_W); bands: (R, 6, SUB_H, SUB_W, NBANDS) zero-filled by the caller.
// Grid: x over IMG_H * IMG_W rays, y over the R rotations.
extern "C" __global__ void SAPSAM_NAME(sapsam_rotate_project_bands_3d)(
    const HU_T* __restrict__ hu, const unsigned char* __restrict__ masks,
    const float* __restrict__ affines, float* __restrict__ gray, float* __restrict__ bands,
    float gray_lo, float gray_hi) {
    const int pixel = blockIdx.x * blockDim.x + threadIdx.x;
    if (pixel >= IMG_H * IMG_W) return;
    const int r = blockIdx.y;
    RotatedSampler sample;
    sample.hu = hu;
    sample.masks = masks;
#pragma unroll
    for (int e = 0; e < 9; ++e) sample.m[e] = affines[r * 12 + e];
#pragma unroll
    for (int e = 0; e < 3; ++e) sample.off[e] = affines[r * 12 + 9 + e];
    project_ray<true>(sample, r, pixel / IMG_W, pixel % IMG_W, gray, bands, gray_lo, gray_hi);
}
