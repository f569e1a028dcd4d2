"""cffi API-mode build of `xenstream.hv._kernels`: the compiled twins of xenstream.hv.pagetables.

Built at install time through setup.py's `cffi_modules`. Semantics are documented on the Python
twins; the two must stay identical (tests/hv/test_kernels.py checks that on random inputs).
"""

from cffi import FFI

# The translation tables, declared once for both cffi's cdef and the C source.
TABLES_STRUCT = """
typedef struct {
    const uint64_t *m2p;
    uint64_t m2p_len;
    uint64_t max_mfn;
    const void *const *leaves;
    uint64_t p2m_size;
    unsigned leaf_shift;
    unsigned p2m_width;
    uint64_t max_pfn;
    unsigned levels;
    uint64_t compat_m2p_mfn0;
} xs_tables;
"""

CDEF = TABLES_STRUCT + """
int64_t xs_normalise_pages(const xs_tables *t, uint8_t *pages, const uint8_t *levels, size_t n,
                           uint8_t *status);
int64_t xs_localise_pages(const xs_tables *t, uint8_t *pages, const uint8_t *levels, size_t n,
                          uint64_t *missing, int64_t *err);
int64_t xs_pack_page_words(const uint64_t *pfns, const uint32_t *types, size_t n, uint64_t *out);
int64_t xs_take_l1_refs(const uint8_t *page, const uint32_t *ext_of, uint64_t max_mfn, const uint16_t *owner,
                        uint8_t *ptype, uint32_t *tcount, const uint8_t *flags, uint16_t domid,
                        uint64_t refused, uint8_t writable_type, uint8_t special_flag, uint32_t *taken,
                        int64_t *taken_count);
int64_t xs_frame_slots(const uint64_t *mfns, size_t n, const uint32_t *ext_of, uint64_t max_mfn,
                       const uint16_t *owner, const uint8_t *ptype, const uint32_t *tcount, uint16_t domid,
                       int writable, uint8_t writable_type, int64_t *slots);
int64_t xs_slot_runs(const int64_t *slots, size_t n, uint32_t *starts, uint32_t *counts);
void xs_page_type_codes(const uint64_t *mfns, size_t n, const uint32_t *ext_of, uint64_t max_mfn,
                        const uint16_t *owner, const uint8_t *ptype, const uint32_t *tcount,
                        const uint8_t *flags, uint16_t domid, const uint8_t *type_levels, uint32_t *codes);
int64_t xs_mark_pfns(const uint64_t *pfns, size_t n, uint64_t low, uint8_t *marks, size_t marks_len);
int64_t xs_check_legacy_batch(const uint8_t *raw, unsigned entry_size, size_t n, uint64_t p2m_size,
                              uint64_t *scratch);
int64_t xs_legacy_batch_words(const uint8_t *raw, unsigned entry_size, size_t n, uint64_t *words,
                              uint64_t *scratch);
"""

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

""" + TABLES_STRUCT + r"""
#define INVALID_MFN   UINT64_MAX
#define FRAME_MASK    0x000FFFFFFFFFF000ULL
#define PRESENT       1ULL
#define PSE           (1ULL << 7)
#define PFN_MASK_V2   0x000FFFFFFFFFFFFFULL
#define ST_OK         0
#define ST_BAD_MFN    1
#define ST_SUPERPAGE  2
#define ST_BAD_LEVEL  3
#define LOC_PFN_RANGE 1
#define LOC_BAD_MFN   2
#define LOC_BAD_LEVEL 3

static inline uint64_t load64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void store64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

static inline uint64_t p2m_get(const xs_tables *t, uint64_t pfn)
{
    if (pfn >= t->p2m_size)
        return INVALID_MFN;
    const uint8_t *leaf = t->leaves[pfn >> t->leaf_shift];
    uint64_t idx = pfn & ((1ULL << t->leaf_shift) - 1);
    if (t->p2m_width == 8)
        return load64(leaf + idx * 8);
    uint32_t v;
    memcpy(&v, leaf + idx * 4, 4);
    return v == UINT32_MAX ? INVALID_MFN : v;
}

/* pfn backing mfn if M2P and P2M agree (spec 1.1), else INVALID_MFN */
static inline uint64_t in_pseudophys(const xs_tables *t, uint64_t mfn)
{
    if (mfn > t->max_mfn || mfn >= t->m2p_len)
        return INVALID_MFN;
    uint64_t pfn = t->m2p[mfn];
    if (pfn > t->max_pfn || p2m_get(t, pfn) != mfn)
        return INVALID_MFN;
    return pfn;
}

static inline int known_code(uint32_t code)
{
    switch (code >> 28) {
    case 0x0: case 0x1: case 0x2: case 0x3: case 0x4:
    case 0x9: case 0xA: case 0xB: case 0xC:
    case 0xD: case 0xE: case 0xF:
        return (code & 0x0FFFFFFFu) == 0;
    default:
        return 0;
    }
}

static inline int has_data(uint32_t code)
{
    uint32_t nib = code >> 28;
    return nib != 0xD && nib != 0xE && nib != 0xF;
}

int64_t xs_normalise_pages(const xs_tables *t, uint8_t *pages, const uint8_t *levels, size_t n,
                           uint8_t *status)
{
    int64_t failed = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t *page = pages + i * 4096;
        unsigned level = levels[i];
        int xf = 1, xl = 0, code = ST_OK;
        if (level < 1 || level > 4 || (t->levels == 3 && level == 4)) {
            code = ST_BAD_LEVEL;
        } else if (t->levels == 4) {
            if (level == 4) { xf = 256; xl = 271; }
        } else if (level == 3) {
            xf = 4; xl = 511;
        } else if (level == 2 && ((load64(page + 428 * 8) & FRAME_MASK) >> 12) == t->compat_m2p_mfn0) {
            xf = 428; xl = 511;
        }
        for (int j = 0; code == ST_OK && j < 512; j++) {
            uint64_t pte = (j >= xf && j <= xl) ? 0 : load64(page + j * 8);
            if (pte & PRESENT) {
                if (level > 1 && (pte & PSE)) { code = ST_SUPERPAGE; break; }
                uint64_t pfn = in_pseudophys(t, (pte & FRAME_MASK) >> 12);
                if (pfn == INVALID_MFN) { code = ST_BAD_MFN; break; }
                pte = (pte & ~FRAME_MASK) | ((pfn << 12) & FRAME_MASK);
            }
            store64(page + j * 8, pte);
        }
        status[i] = (uint8_t)code;
        failed += code != ST_OK;
    }
    return failed;
}

int64_t xs_localise_pages(const xs_tables *t, uint8_t *pages, const uint8_t *levels, size_t n,
                          uint64_t *missing, int64_t *err)
{
    int64_t count = 0;
    for (size_t i = 0; i < n; i++) {
        if (levels[i] < 1 || levels[i] > 4) {
            err[0] = LOC_BAD_LEVEL; err[1] = (int64_t)i; err[2] = -1;
            return -1;
        }
        const uint8_t *page = pages + i * 4096;
        for (int j = 0; j < 512; j++) {
            uint64_t pte = load64(page + j * 8);
            if (!(pte & PRESENT))
                continue;
            uint64_t pfn = (pte & FRAME_MASK) >> 12;
            if (pfn > t->max_pfn) {
                err[0] = LOC_PFN_RANGE; err[1] = (int64_t)i; err[2] = j;
                return -1;
            }
            if (p2m_get(t, pfn) == INVALID_MFN)
                missing[count++] = pfn;
        }
    }
    if (count)
        return count;
    for (size_t i = 0; i < n; i++) {
        uint8_t *page = pages + i * 4096;
        for (int j = 0; j < 512; j++) {
            uint64_t pte = load64(page + j * 8);
            if (!(pte & PRESENT))
                continue;
            uint64_t mfn = p2m_get(t, (pte & FRAME_MASK) >> 12);
            if (in_pseudophys(t, mfn) == INVALID_MFN) {
                err[0] = LOC_BAD_MFN; err[1] = (int64_t)i; err[2] = j;
                return -1;
            }
            store64(page + j * 8, (pte & ~FRAME_MASK) | ((mfn << 12) & FRAME_MASK));
        }
    }
    return 0;
}

int64_t xs_pack_page_words(const uint64_t *pfns, const uint32_t *types, size_t n, uint64_t *out)
{
    int64_t data = 0;
    for (size_t i = 0; i < n; i++) {
        if (!known_code(types[i]) || pfns[i] > PFN_MASK_V2)
            return -1 - (int64_t)i;
        out[i] = ((uint64_t)types[i] << 32) | pfns[i];
        data += has_data(types[i]);
    }
    return data;
}

/* The simulator's L1 validation (twin: xenstream.hv.sim.hotpaths). */
int64_t xs_take_l1_refs(const uint8_t *page, const uint32_t *ext_of, uint64_t max_mfn, const uint16_t *owner,
                        uint8_t *ptype, uint32_t *tcount, const uint8_t *flags, uint16_t domid,
                        uint64_t refused, uint8_t writable_type, uint8_t special_flag, uint32_t *taken,
                        int64_t *taken_count)
{
    int64_t count = 0;
    for (int64_t i = 0; i < 512; i++) {
        uint64_t pte = load64(page + i * 8);
        int reason = 0;
        if (!(pte & PRESENT))
            continue;
        if (pte & refused) {
            reason = 1;
        } else {
            uint64_t mfn = (pte & FRAME_MASK) >> 12;
            uint32_t extent = mfn < max_mfn ? ext_of[mfn >> 9] : 0;
            uint64_t child = ((uint64_t)(extent - 1) << 9) | (mfn & 511);
            if (!extent || owner[child] != domid) {
                reason = 2;
            } else if ((pte & 2) && !(flags[child] & special_flag)) {
                uint32_t references = tcount[child];
                if (references && ptype[child] != writable_type) {
                    reason = 3;
                } else {
                    ptype[child] = writable_type;
                    tcount[child] = references + 1;
                    taken[count++] = (uint32_t)child;
                }
            }
        }
        if (reason) {
            *taken_count = count;
            return -(1 + ((i << 2) | reason));
        }
    }
    *taken_count = count;
    return count;
}

static inline int64_t slot_of(const uint32_t *ext_of, uint64_t max_mfn, uint64_t mfn)
{
    uint32_t extent = mfn < max_mfn ? ext_of[mfn >> 9] : 0;
    return extent ? (int64_t)(((uint64_t)(extent - 1) << 9) | (mfn & 511)) : -1;
}

int64_t xs_frame_slots(const uint64_t *mfns, size_t n, const uint32_t *ext_of, uint64_t max_mfn,
                       const uint16_t *owner, const uint8_t *ptype, const uint32_t *tcount, uint16_t domid,
                       int writable, uint8_t writable_type, int64_t *slots)
{
    int64_t mapped = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t slot = slot_of(ext_of, max_mfn, mfns[i]);
        if (slot >= 0 && (owner[slot] != domid ||
                          (writable && tcount[slot] && ptype[slot] != writable_type)))
            slot = -1;
        slots[i] = slot;
        mapped += slot >= 0;
    }
    return mapped;
}

int64_t xs_slot_runs(const int64_t *slots, size_t n, uint32_t *starts, uint32_t *counts)
{
    int64_t runs = 0, previous = -2;
    for (size_t i = 0; i < n; i++) {
        int64_t slot = slots[i];
        if (slot < 0) {
            previous = -2;
            continue;
        }
        if (slot == previous + 1) {
            counts[runs - 1]++;
        } else {
            starts[runs] = (uint32_t)i;
            counts[runs] = 1;
            runs++;
        }
        previous = slot;
    }
    return runs;
}

#define SIM_FLAG_VALIDATED 1
#define SIM_FLAG_PINNED    2
#define SIM_FLAG_BROKEN    4
#define SIM_FLAG_SPECIAL   8

void xs_page_type_codes(const uint64_t *mfns, size_t n, const uint32_t *ext_of, uint64_t max_mfn,
                        const uint16_t *owner, const uint8_t *ptype, const uint32_t *tcount,
                        const uint8_t *flags, uint16_t domid, const uint8_t *type_levels, uint32_t *codes)
{
    for (size_t i = 0; i < n; i++) {
        int64_t slot = slot_of(ext_of, max_mfn, mfns[i]);
        if (slot < 0 || owner[slot] != domid || (flags[slot] & SIM_FLAG_SPECIAL)) {
            codes[i] = 0xFu << 28;
            continue;
        }
        uint8_t f = flags[slot];
        if (f & SIM_FLAG_BROKEN)
            codes[i] = 0xDu << 28;
        else if (f & SIM_FLAG_PINNED)
            codes[i] = ((uint32_t)type_levels[ptype[slot]] << 28) | (1u << 31);
        else if (tcount[slot] && (f & SIM_FLAG_VALIDATED))
            codes[i] = (uint32_t)type_levels[ptype[slot]] << 28;
        else
            codes[i] = 0;
    }
}

int64_t xs_mark_pfns(const uint64_t *pfns, size_t n, uint64_t low, uint8_t *marks, size_t marks_len)
{
    for (size_t i = 0; i < n; i++) {
        if (pfns[i] < low || pfns[i] - low >= marks_len)
            return -1 - (int64_t)i;
        marks[pfns[i] - low] = 1;
    }
    return (int64_t)n;
}

/* v1 pfn_type entries (u32 or u64, type nibble in bits 28-31): read by the legacy kernels below */
#define V1_XTAB_ENTRY 0xF0000000ULL
#define V1_PFN_MASK   0x0FFFFFFFULL

static inline uint64_t v1_entry(const uint8_t *raw, unsigned entry_size, size_t i)
{
    if (entry_size == 8)
        return load64(raw + i * 8);
    uint32_t e32;
    memcpy(&e32, raw + i * 4, 4);
    return e32;
}

/* ---- v1 page batches (the converter's hot path; twins: legacy/walk.py and convert/transform.py) ---- */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Whether the `n` pfns in `pfns` (reordered here) repeat one; `ascending` says they already rise. */
static int has_duplicate(uint64_t *pfns, size_t n, int ascending)
{
    if (ascending)
        return 0;
    qsort(pfns, n, sizeof *pfns, cmp_u64);
    for (size_t i = 1; i < n; i++)
        if (pfns[i] == pfns[i - 1])
            return 1;
    return 0;
}

/* The data-page count of a valid v1 pfn_type array, or -1 when any entry is bad (undefined type, bits
   32-63 set, a pfn at or beyond p2m_size outside XTAB, a pfn twice outside bare XTAB entries): the
   caller's own checks then name the fault. `scratch` holds n u64. */
int64_t xs_check_legacy_batch(const uint8_t *raw, unsigned entry_size, size_t n, uint64_t p2m_size,
                              uint64_t *scratch)
{
    int64_t data = 0;
    size_t kept = 0;
    int ascending = 1;
    for (size_t i = 0; i < n; i++) {
        uint64_t entry = v1_entry(raw, entry_size, i);
        unsigned type = (unsigned)(entry >> 28) & 0xF;
        uint64_t pfn = entry & V1_PFN_MASK;
        if ((entry >> 32) || (type >= 5 && type <= 7) || (type != 0xF && pfn >= p2m_size))
            return -1;
        data += has_data((uint32_t)entry);
        if (entry == V1_XTAB_ENTRY)
            continue;
        if (kept && pfn <= scratch[kept - 1])
            ascending = 0;
        scratch[kept++] = pfn;
    }
    return has_duplicate(scratch, kept, ascending) ? -1 : data;
}

/* v2 PAGE_DATA words (type nibble in bits 60-63, LPINTAB alone read as NOTAB) for a v1 pfn_type array,
   bare XTAB entries dropped; only bits 0-31 of an entry count. Returns the word count, or -1 if a pfn
   repeats. `scratch` holds n u64. */
int64_t xs_legacy_batch_words(const uint8_t *raw, unsigned entry_size, size_t n, uint64_t *words,
                              uint64_t *scratch)
{
    size_t kept = 0;
    int ascending = 1;
    for (size_t i = 0; i < n; i++) {
        uint64_t entry = v1_entry(raw, entry_size, i);
        if (entry == V1_XTAB_ENTRY)
            continue;
        uint64_t type = (entry >> 28) & 0xF;
        uint64_t pfn = entry & V1_PFN_MASK;
        if (kept && pfn <= scratch[kept - 1])
            ascending = 0;
        scratch[kept] = pfn;
        words[kept++] = ((type == 8 ? 0 : type) << 60) | pfn;
    }
    return has_duplicate(scratch, kept, ascending) ? -1 : (int64_t)kept;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("xenstream.hv._kernels", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
